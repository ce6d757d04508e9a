//! The daemon's policy: who may mount which image, and how.
//!
//! A TOML file (`--policy FILE`); every key is optional and unknown keys are
//! refused, so a typo cannot silently loosen the policy:
//!
//! ```toml
//! # Directories of trusted X.509 certificates for root-hash signatures.
//! trust_dirs = ["/etc/immount/trust.d"]
//!
//! [signed]                  # a valid signature from a trusted certificate
//! allowed = true
//! flows = ["namespace", "directory"]
//! allow_other = true        # the caller may ask for allow_other
//! ids = "kept"              # "kept": the image's owners; "caller": the caller's
//! nosuid = true
//! nodev = true
//! noexec = false
//! max_mounts_per_user = 32
//! server_memory_mib = 1024
//!
//! [unsigned]                # everything else
//! allowed = true
//! flows = ["namespace", "directory"]
//! allow_other = false
//! ids = "caller"
//! nosuid = true
//! nodev = true
//! noexec = false
//! max_mounts_per_user = 16
//! server_memory_mib = 512
//! ```
//!
//! The defaults are those above. Whatever the policy says, a mount the
//! daemon attaches in the host namespace (flow "directory") is always
//! `nosuid,nodev`, and the caller can only tighten options (`noexec`,
//! `mapids`) or ask for `allow_other` where the class permits it.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The trust class of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Its root hash carries a valid signature from a trusted certificate.
    Signed,
    /// Anything else.
    Unsigned,
}

impl Class {
    /// `"signed"` or `"unsigned"`.
    pub fn name(self) -> &'static str {
        match self {
            Class::Signed => "signed",
            Class::Unsigned => "unsigned",
        }
    }
}

/// How the mount reaches the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flow {
    /// (a) A detached mount fd for a caller in its own user and mount
    /// namespace, who attaches it with `move_mount`.
    Namespace,
    /// (b) The daemon attaches the mount on a directory the caller owns.
    Directory,
}

impl Flow {
    /// `"namespace"` or `"directory"`.
    pub fn name(self) -> &'static str {
        match self {
            Flow::Namespace => "namespace",
            Flow::Directory => "directory",
        }
    }
}

/// Whose ids the files carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ids {
    /// The owners recorded in the image.
    Kept,
    /// Every file belongs to the caller.
    Caller,
}

/// The rules of one class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassPolicy {
    /// Whether images of this class may be mounted at all.
    pub allowed: bool,
    /// The flows allowed.
    pub flows: Vec<Flow>,
    /// Whether the caller may ask for `allow_other`.
    pub allow_other: bool,
    /// Whose ids the files carry.
    pub ids: Ids,
    /// Mount flags always applied.
    pub nosuid: bool,
    /// See `nosuid`.
    pub nodev: bool,
    /// See `nosuid`.
    pub noexec: bool,
    /// Mounts one uid may hold at once (across classes, counted per class).
    pub max_mounts_per_user: usize,
    /// `RLIMIT_DATA` of each server, in bytes.
    pub server_memory: u64,
}

impl ClassPolicy {
    fn default_for(class: Class) -> Self {
        let signed = class == Class::Signed;
        ClassPolicy {
            allowed: true,
            flows: vec![Flow::Namespace, Flow::Directory],
            allow_other: signed,
            ids: if signed { Ids::Kept } else { Ids::Caller },
            nosuid: true,
            nodev: true,
            noexec: false,
            max_mounts_per_user: if signed { 32 } else { 16 },
            server_memory: if signed { 1024 << 20 } else { 512 << 20 },
        }
    }
}

/// The whole policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Directories of trusted certificates.
    pub trust_dirs: Vec<PathBuf>,
    /// Rules for signed images.
    pub signed: ClassPolicy,
    /// Rules for unsigned images.
    pub unsigned: ClassPolicy,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            trust_dirs: vec![PathBuf::from("/etc/immount/trust.d")],
            signed: ClassPolicy::default_for(Class::Signed),
            unsigned: ClassPolicy::default_for(Class::Unsigned),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    trust_dirs: Option<Vec<PathBuf>>,
    signed: Option<ClassFile>,
    unsigned: Option<ClassFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassFile {
    allowed: Option<bool>,
    flows: Option<Vec<Flow>>,
    allow_other: Option<bool>,
    ids: Option<Ids>,
    nosuid: Option<bool>,
    nodev: Option<bool>,
    noexec: Option<bool>,
    max_mounts_per_user: Option<usize>,
    server_memory_mib: Option<u64>,
}

impl ClassFile {
    fn apply(self, to: &mut ClassPolicy) -> Result<(), PolicyError> {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { to.$f = v; } )* };
        }
        set!(
            allowed,
            flows,
            allow_other,
            ids,
            nosuid,
            nodev,
            noexec,
            max_mounts_per_user
        );
        if let Some(mib) = self.server_memory_mib {
            if !(16..=1 << 20).contains(&mib) {
                return Err(PolicyError::Invalid(format!(
                    "server_memory_mib = {mib}: expected 16 to 1048576"
                )));
            }
            to.server_memory = mib << 20;
        }
        Ok(())
    }
}

/// A policy file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Reading failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Not valid TOML, or not our keys.
    #[error("{0}")]
    Invalid(String),
}

impl Policy {
    /// Parse a policy from TOML text; absent keys keep their defaults.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| PolicyError::Invalid(e.to_string()))?;
        let mut policy = Policy::default();
        if let Some(dirs) = file.trust_dirs {
            policy.trust_dirs = dirs;
        }
        if let Some(c) = file.signed {
            c.apply(&mut policy.signed)?;
        }
        if let Some(c) = file.unsigned {
            c.apply(&mut policy.unsigned)?;
        }
        Ok(policy)
    }

    /// Read the policy at `path`.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError::Io(path.display().to_string(), e))?;
        Policy::from_toml(&text).map_err(|e| match e {
            PolicyError::Invalid(m) => PolicyError::Invalid(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// The rules of `class`.
    pub fn class(&self, class: Class) -> &ClassPolicy {
        match class {
            Class::Signed => &self.signed,
            Class::Unsigned => &self.unsigned,
        }
    }

    /// Decide a request of `class` by `flow` with the caller's `wanted`
    /// options. The per-user limit is the caller's to check (it needs the
    /// live count): see [`Applied::max_mounts`].
    pub fn decide(&self, class: Class, flow: Flow, wanted: &Wanted) -> Result<Applied, String> {
        let rules = self.class(class);
        if !rules.allowed {
            return Err(format!("{} images are not allowed", class.name()));
        }
        if !rules.flows.contains(&flow) {
            return Err(format!(
                "{} images may not be mounted by flow {}",
                class.name(),
                flow.name()
            ));
        }
        if wanted.allow_other && !rules.allow_other {
            return Err(format!(
                "allow_other is not allowed for {} images",
                class.name()
            ));
        }
        let host = flow == Flow::Directory;
        Ok(Applied {
            class,
            flow,
            ids: if wanted.map_ids {
                Ids::Caller
            } else {
                rules.ids
            },
            allow_other: wanted.allow_other,
            nosuid: rules.nosuid || host,
            nodev: rules.nodev || host,
            noexec: rules.noexec || wanted.noexec,
            max_mounts: rules.max_mounts_per_user,
            server_memory: rules.server_memory,
        })
    }
}

/// Options the caller asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// `allow_other`.
    pub allow_other: bool,
    /// `noexec`.
    pub noexec: bool,
    /// `mapids`: the caller's ids even where the class keeps the image's.
    pub map_ids: bool,
}

impl Wanted {
    /// Parse option words; unknown ones are an error naming them.
    pub fn parse(words: &[String]) -> Result<Wanted, String> {
        let mut w = Wanted::default();
        for word in words {
            match word.as_str() {
                "allow_other" => w.allow_other = true,
                "noexec" => w.noexec = true,
                "mapids" => w.map_ids = true,
                // Always applied anyway.
                "ro" | "nosuid" | "nodev" => {}
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        Ok(w)
    }
}

/// What was decided for one mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The image's class.
    pub class: Class,
    /// The flow.
    pub flow: Flow,
    /// Whose ids the files carry.
    pub ids: Ids,
    /// `allow_other`.
    pub allow_other: bool,
    /// `nosuid`.
    pub nosuid: bool,
    /// `nodev`.
    pub nodev: bool,
    /// `noexec`.
    pub noexec: bool,
    /// The caller's mount limit for this class.
    pub max_mounts: usize,
    /// The server's `RLIMIT_DATA`.
    pub server_memory: u64,
}

impl fmt::Display for Applied {
    /// The mount options, comma-separated, as logged and replied.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ro")?;
        for (on, name) in [
            (self.nosuid, "nosuid"),
            (self.nodev, "nodev"),
            (self.noexec, "noexec"),
            (self.allow_other, "allow_other"),
        ] {
            if on {
                write!(f, ",{name}")?;
            }
        }
        match self.ids {
            Ids::Kept => f.write_str(",ids=kept"),
            Ids::Caller => f.write_str(",ids=caller"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_issue() {
        let p = Policy::from_toml("").unwrap();
        assert_eq!(p, Policy::default());
        let signed = p
            .decide(Class::Signed, Flow::Directory, &Wanted::default())
            .unwrap();
        assert_eq!(signed.ids, Ids::Kept);
        assert!(signed.nosuid && signed.nodev);
        let unsigned = p
            .decide(Class::Unsigned, Flow::Namespace, &Wanted::default())
            .unwrap();
        assert_eq!(unsigned.ids, Ids::Caller);
        let other = Wanted {
            allow_other: true,
            ..Wanted::default()
        };
        assert!(p.decide(Class::Unsigned, Flow::Directory, &other).is_err());
        assert!(
            p.decide(Class::Signed, Flow::Directory, &other)
                .unwrap()
                .allow_other
        );
    }

    #[test]
    fn files_override_and_typos_are_refused() {
        let p = Policy::from_toml(
            "trust_dirs = [\"/x\"]\n[unsigned]\nallowed = false\n[signed]\nflows = [\"namespace\"]\nnosuid = false\nserver_memory_mib = 64\n",
        )
        .unwrap();
        assert_eq!(p.trust_dirs, vec![PathBuf::from("/x")]);
        assert!(p
            .decide(Class::Unsigned, Flow::Namespace, &Wanted::default())
            .is_err());
        assert!(p
            .decide(Class::Signed, Flow::Directory, &Wanted::default())
            .is_err());
        let a = p
            .decide(Class::Signed, Flow::Namespace, &Wanted::default())
            .unwrap();
        assert!(!a.nosuid);
        assert_eq!(a.server_memory, 64 << 20);
        assert!(Policy::from_toml("[unsigned]\nalowed = true\n").is_err());
        assert!(Policy::from_toml("[unsigned]\nids = \"root\"\n").is_err());
        assert!(Policy::from_toml("[signed]\nserver_memory_mib = 1\n").is_err());
    }

    #[test]
    fn the_host_flow_is_always_nosuid_nodev() {
        let p = Policy::from_toml("[unsigned]\nnosuid = false\nnodev = false\n").unwrap();
        let a = p
            .decide(Class::Unsigned, Flow::Directory, &Wanted::default())
            .unwrap();
        assert!(a.nosuid && a.nodev);
        let a = p
            .decide(Class::Unsigned, Flow::Namespace, &Wanted::default())
            .unwrap();
        assert!(!a.nosuid && !a.nodev);
        assert_eq!(a.to_string(), "ro,ids=caller");
        assert!(Wanted::parse(&["suid".into()]).is_err());
    }
}
