//! The varlink interfaces immountd serves, as interface definitions (IDL)
//! returned by `org.varlink.service.GetInterfaceDescription`.

/// Our interface's name.
pub const MOUNT_INTERFACE: &str = "io.immount.Mount";
/// The service interface every varlink service implements.
pub const SERVICE_INTERFACE: &str = "org.varlink.service";

/// `io.immount.Mount`, modelled on systemd's io.systemd.MountFileSystem.
pub const MOUNT_IDL: &str = "\
# Mount EROFS images for unprivileged callers. The image is never parsed by
# the daemon: each mount is served by its own sandboxed FUSE server.
interface io.immount.Mount

# What the policy decided for a mount.
type Decision (
  # \"signed\" (root hash signed by a trusted certificate) or \"unsigned\".
  class: string,
  # \"verity:<root hash>\" or \"sha256:<digest of the image>\".
  imageIdentity: string,
  # \"namespace\" (mount fd returned) or \"directory\" (attached by the daemon).
  flow: string,
  # Whether file ownership is the image's (true) or the caller's (false).
  idsKept: bool,
  allowOther: bool,
  nosuid: bool,
  nodev: bool,
  noexec: bool,
  # RLIMIT_DATA of the server, in bytes.
  serverMemoryLimit: int,
  # The mount options applied, comma-separated.
  options: string
)

# Mount an EROFS image. File descriptor parameters are indexes into the
# descriptors sent with the call (SCM_RIGHTS). Give userNamespaceFileDescriptor
# to get a detached mount fd back (attach it with move_mount), or
# directoryFileDescriptor (a directory the caller owns) to have the daemon
# attach the mount there.
method MountImage(
  imageFileDescriptor: int,
  userNamespaceFileDescriptor: ?int,
  directoryFileDescriptor: ?int,
  verityDataFileDescriptor: ?int,
  # Offset of the verity superblock in the verity data (or image) file.
  # With rootHash alone, a tree appended to the image right after the
  # filesystem (4 KiB aligned) is used.
  verityHashOffset: ?int,
  # The dm-verity root hash, hex.
  rootHash: ?string,
  # A PKCS#7 signature of the root hash, base64.
  rootHashSignature: ?string,
  # Extra options: noexec, allow_other, mapids.
  options: ?[]string
) -> (
  mountFileDescriptor: ?int,
  decision: Decision
)

# The policy does not allow this mount.
error Denied (reason: string)
# A file descriptor is missing, unused, of the wrong kind or not allowed.
error BadFileDescriptor (reason: string)
# The root hash, verity data or signature are unusable.
error VerityFailure (reason: string)
# The image cannot be served (corrupt or unsupported).
error IncompatibleImage (reason: string)
# The caller has as many mounts as the policy allows.
error LimitReached (limit: int)
# Something failed on the daemon's side.
error InternalError (reason: string)
";

/// `org.varlink.service`, as the varlink specification defines it.
pub const SERVICE_IDL: &str = "\
# The Varlink Service Interface is provided by every varlink service.
interface org.varlink.service

# Information about the service and the interfaces it implements.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# The description of an interface the service implements.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found.
error MethodNotFound (method: string)

# The interface defines the method, but the service does not implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# The client is denied access.
error PermissionDenied ()

# The method must be called with more set to true.
error ExpectedMore ()
";

/// The description of `interface`, if we serve it.
pub fn description(interface: &str) -> Option<&'static str> {
    match interface {
        MOUNT_INTERFACE => Some(MOUNT_IDL),
        SERVICE_INTERFACE => Some(SERVICE_IDL),
        _ => None,
    }
}
