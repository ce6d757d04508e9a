//! `immount mount` through immountd, the delegation daemon: kept apart from
//! cmd_mount.rs, which the fuse crate also compiles into its test twin and
//! which must not depend on the daemon (the daemon depends on the fuse crate).

use crate::cmd_mount::MountArgs;

/// When a plain user runs `immount mount` and the daemon's socket exists,
/// mount through the daemon; `None` when the mount should be made locally.
pub fn try_mount(args: &MountArgs) -> Option<i32> {
    if args.foreground || args.no_daemon || rustix::process::geteuid().is_root() {
        return None;
    }
    // The background server re-runs this program with a ready pipe: it
    // serves locally, as its parent decided.
    if std::env::var_os(fuse::daemon::READY_FD_ENV).is_some() {
        return None;
    }
    let socket = mountd::client::socket_path(args.socket.as_deref());
    if !mountd::client::daemon_available(&socket) {
        return None;
    }
    Some(mount_through_daemon(args, &socket))
}

/// Flow (b) of immountd: the daemon decides by its policy, serves the image
/// from a sandboxed server of its own and attaches the mount to DIR, which
/// this user must own; always nosuid,nodev.
fn mount_through_daemon(args: &MountArgs, socket: &std::path::Path) -> i32 {
    let mut options = Vec::new();
    for o in args
        .options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        match o {
            "allow_other" | "noexec" => options.push(o.to_string()),
            _ => {
                eprintln!("immount: warning: option {o} is not used when mounting through immountd")
            }
        }
    }
    if args.sandbox_user.is_some() || args.sandbox_memory.is_some() {
        eprintln!(
            "immount: warning: --sandbox-user and --sandbox-memory are not used when mounting \
             through immountd (its policy sets them)"
        );
    }
    if !args.devices.is_empty() {
        eprintln!("immount: extra devices cannot be passed to immountd; use --no-daemon");
        return crate::EXIT_USAGE.into();
    }
    let spec = mountd::client::ImageSpec {
        image: args.image.clone(),
        options,
        sidecars: true,
        ..Default::default()
    };
    match mountd::client::mount_via_daemon(socket, &spec, &args.mountpoint) {
        Ok(d) => {
            eprintln!(
                "immount: mounted through immountd ({}): {} image {}, {}",
                socket.display(),
                d.class,
                d.image_identity,
                d.options
            );
            0
        }
        Err(e) => {
            eprintln!("immount: {e}");
            e.exit_code()
        }
    }
}
