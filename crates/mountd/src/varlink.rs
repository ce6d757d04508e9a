//! A small, strict varlink codec: JSON objects terminated by a NUL byte
//! over a Unix stream socket, with descriptors passed by `SCM_RIGHTS`.
//!
//! Limits, so that a hostile peer costs a bounded amount of memory:
//! [`MAX_MESSAGE`] bytes per message and
//! [`immount_sys::mountd::MAX_FDS_PER_MESSAGE`] descriptors. The
//! descriptors received while a message is read belong to that message;
//! a call that names descriptor 0 means the first of them (as systemd's
//! io.systemd.MountFileSystem does).
//!
//! Why not a crate: the maintained Rust varlink crates either do not pass
//! descriptors or bring an async runtime; the part of the protocol a
//! one-method service needs is this small.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use immount_sys::mountd as sys;
use serde_json::{Map, Value};

/// The largest message accepted, terminator included.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Why reading a message failed. Each means the connection is dropped:
/// the framing can no longer be trusted.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the connection between messages.
    #[error("connection closed")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed mid-message ({0} bytes)")]
    Truncated(usize),
    /// No terminator within [`MAX_MESSAGE`] bytes.
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    /// More descriptors than a message may carry.
    #[error("too many descriptors")]
    TooManyFds,
    /// A socket error (a timeout included).
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One message read from the socket: its JSON text (without the NUL) and
/// the descriptors that came with it.
#[derive(Debug)]
pub struct Message {
    /// The bytes before the terminator.
    pub json: Vec<u8>,
    /// Descriptors received with them, in order.
    pub fds: Vec<OwnedFd>,
}

/// One end of a varlink connection.
#[derive(Debug)]
pub struct Connection<S: AsFd> {
    sock: S,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl<S: AsFd> Connection<S> {
    /// Wrap a connected stream socket.
    pub fn new(sock: S) -> Self {
        Connection {
            sock,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// Give the socket back (unread buffered bytes are dropped).
    pub fn into_socket(self) -> S {
        self.sock
    }

    /// The socket.
    pub fn socket(&self) -> &S {
        &self.sock
    }

    /// Read the next message.
    pub fn read_message(&mut self) -> Result<Message, ReadError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == 0) {
                let json = self.buf[..end].to_vec();
                self.buf.drain(..=end);
                return Ok(Message {
                    json,
                    fds: std::mem::take(&mut self.fds),
                });
            }
            if self.buf.len() >= MAX_MESSAGE {
                return Err(ReadError::TooLarge);
            }
            let want = chunk.len().min(MAX_MESSAGE - self.buf.len());
            let got = sys::recv_with_fds(self.sock.as_fd(), &mut chunk[..want])?;
            if got.fds_truncated || self.fds.len() + got.fds.len() > sys::MAX_FDS_PER_MESSAGE {
                return Err(ReadError::TooManyFds);
            }
            self.fds.extend(got.fds);
            if got.bytes == 0 {
                return Err(if self.buf.is_empty() && self.fds.is_empty() {
                    ReadError::Closed
                } else {
                    ReadError::Truncated(self.buf.len())
                });
            }
            self.buf.extend_from_slice(&chunk[..got.bytes]);
        }
    }

    /// Send one message (`value` followed by NUL) with `fds` attached.
    pub fn send(&self, value: &Value, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
        bytes.push(0);
        let mut sent = sys::send_with_fds(self.sock.as_fd(), &bytes, fds)?;
        while sent < bytes.len() {
            let n = sys::send_with_fds(self.sock.as_fd(), &bytes[sent..], &[])?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            sent += n;
        }
        Ok(())
    }
}

/// A varlink error reply: its qualified name and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct VarlinkError {
    /// e.g. `org.varlink.service.InvalidParameter`.
    pub name: String,
    /// The error's parameters.
    pub parameters: Map<String, Value>,
}

impl VarlinkError {
    /// An error named `name` with one string parameter.
    pub fn new(name: &str, key: &str, value: impl Into<String>) -> Self {
        let mut parameters = Map::new();
        parameters.insert(key.to_owned(), Value::String(value.into()));
        VarlinkError {
            name: name.to_owned(),
            parameters,
        }
    }

    /// `org.varlink.service.InvalidParameter`.
    pub fn invalid_parameter(parameter: &str) -> Self {
        Self::new(
            "org.varlink.service.InvalidParameter",
            "parameter",
            parameter,
        )
    }

    /// `org.varlink.service.MethodNotFound`.
    pub fn method_not_found(method: &str) -> Self {
        Self::new("org.varlink.service.MethodNotFound", "method", method)
    }

    /// `org.varlink.service.InterfaceNotFound`.
    pub fn interface_not_found(interface: &str) -> Self {
        Self::new(
            "org.varlink.service.InterfaceNotFound",
            "interface",
            interface,
        )
    }

    /// The reply message.
    pub fn to_reply(&self) -> Value {
        let mut m = Map::new();
        m.insert("error".into(), Value::String(self.name.clone()));
        m.insert("parameters".into(), Value::Object(self.parameters.clone()));
        Value::Object(m)
    }
}

impl std::fmt::Display for VarlinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)?;
        for (k, v) in &self.parameters {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

impl std::error::Error for VarlinkError {}

/// A method call, checked against the varlink call grammar.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// Fully qualified: `interface.Method`.
    pub method: String,
    /// The parameters (empty when absent).
    pub parameters: Map<String, Value>,
    /// The caller wants no reply.
    pub oneway: bool,
    /// The caller accepts several replies (we always send one).
    pub more: bool,
}

impl Call {
    /// Parse a call. `Err(None)` when the text is not a JSON object at all
    /// (the connection should be dropped); `Err(Some(e))` for a well-formed
    /// object that is not a valid call (answer `e`).
    pub fn parse(json: &[u8]) -> Result<Call, Option<VarlinkError>> {
        let value: Value = serde_json::from_slice(json).map_err(|_| None)?;
        let Value::Object(mut obj) = value else {
            return Err(None);
        };
        let method = match obj.remove("method") {
            Some(Value::String(m)) if is_method_name(&m) => m,
            Some(Value::String(m)) => return Err(Some(VarlinkError::method_not_found(&m))),
            _ => return Err(Some(VarlinkError::invalid_parameter("method"))),
        };
        let parameters = match obj.remove("parameters") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p,
            Some(_) => return Err(Some(VarlinkError::invalid_parameter("parameters"))),
        };
        let mut flag = |key: &str| match obj.remove(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(b),
            Some(_) => Err(Some(VarlinkError::invalid_parameter(key))),
        };
        let oneway = flag("oneway")?;
        let more = flag("more")?;
        let upgrade = flag("upgrade")?;
        if upgrade {
            return Err(Some(VarlinkError::invalid_parameter("upgrade")));
        }
        if let Some(key) = obj.keys().next() {
            return Err(Some(VarlinkError::invalid_parameter(key)));
        }
        Ok(Call {
            method,
            parameters,
            oneway,
            more,
        })
    }

    /// The interface part of the method name.
    pub fn interface(&self) -> &str {
        self.method.rsplit_once('.').map_or("", |(i, _)| i)
    }
}

/// `interface.Method`: dotted lowercase-ish interface, capitalised member.
fn is_method_name(s: &str) -> bool {
    let Some((iface, member)) = s.rsplit_once('.') else {
        return false;
    };
    !iface.is_empty()
        && iface
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && member
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_uppercase())
        && member.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A successful reply carrying `parameters`.
pub fn reply(parameters: Map<String, Value>) -> Value {
    let mut m = Map::new();
    m.insert("parameters".into(), Value::Object(parameters));
    Value::Object(m)
}

/// Typed access to call parameters, each failure an `InvalidParameter`
/// naming the field.
#[derive(Debug)]
pub struct Params {
    map: Map<String, Value>,
}

impl Params {
    /// Take the parameters of a call.
    pub fn new(map: Map<String, Value>) -> Self {
        Params { map }
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        match self.map.remove(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    /// An optional non-negative integer.
    pub fn opt_u64(&mut self, key: &str) -> Result<Option<u64>, VarlinkError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| VarlinkError::invalid_parameter(key)),
        }
    }

    /// A required non-negative integer.
    pub fn u64(&mut self, key: &str) -> Result<u64, VarlinkError> {
        self.opt_u64(key)?
            .ok_or_else(|| VarlinkError::invalid_parameter(key))
    }

    /// An optional string of at most `max` bytes.
    pub fn opt_string(&mut self, key: &str, max: usize) -> Result<Option<String>, VarlinkError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.len() <= max => Ok(Some(s)),
            Some(_) => Err(VarlinkError::invalid_parameter(key)),
        }
    }

    /// An optional array of at most `max_items` strings, each at most
    /// `max_len` bytes.
    pub fn opt_strings(
        &mut self,
        key: &str,
        max_items: usize,
        max_len: usize,
    ) -> Result<Vec<String>, VarlinkError> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) if items.len() <= max_items => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) if s.len() <= max_len => Ok(s),
                    _ => Err(VarlinkError::invalid_parameter(key)),
                })
                .collect(),
            Some(_) => Err(VarlinkError::invalid_parameter(key)),
        }
    }

    /// Refuse any parameter not taken yet.
    pub fn finish(self) -> Result<(), VarlinkError> {
        match self.map.keys().next() {
            Some(k) => Err(VarlinkError::invalid_parameter(k)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_parsed_strictly() {
        let c = Call::parse(br#"{"method":"org.varlink.service.GetInfo"}"#).unwrap();
        assert_eq!(c.interface(), "org.varlink.service");
        assert!(c.parameters.is_empty());
        assert!(Call::parse(b"{\"method\":").unwrap_err().is_none());
        assert!(Call::parse(b"[1]").unwrap_err().is_none());
        let e = Call::parse(br#"{"method":"a.B","bogus":1}"#)
            .unwrap_err()
            .unwrap();
        assert_eq!(e.parameters["parameter"], "bogus");
        let e = Call::parse(br#"{"method":5}"#).unwrap_err().unwrap();
        assert_eq!(e.name, "org.varlink.service.InvalidParameter");
        let e = Call::parse(br#"{"method":"nodot"}"#).unwrap_err().unwrap();
        assert_eq!(e.name, "org.varlink.service.MethodNotFound");
    }

    #[test]
    fn params_name_the_bad_field() {
        let v: Value = serde_json::from_str(r#"{"a":"x","b":[1],"c":3}"#).unwrap();
        let Value::Object(m) = v else { unreachable!() };
        let mut p = Params::new(m);
        assert_eq!(p.opt_u64("a").unwrap_err().parameters["parameter"], "a");
        assert_eq!(
            p.opt_strings("b", 4, 4).unwrap_err().parameters["parameter"],
            "b"
        );
        assert_eq!(p.u64("c").unwrap(), 3);
        assert!(p.finish().is_ok());
    }

    #[test]
    fn framing_over_a_socketpair() {
        let (a, b) = immount_sys::fuse::socketpair().unwrap();
        let mut rx = Connection::new(b);
        let tx = Connection::new(a);
        tx.send(&serde_json::json!({"method": "x.Y"}), &[]).unwrap();
        tx.send(&serde_json::json!({"method": "x.Z"}), &[]).unwrap();
        assert_eq!(rx.read_message().unwrap().json, br#"{"method":"x.Y"}"#);
        assert_eq!(rx.read_message().unwrap().json, br#"{"method":"x.Z"}"#);
        let big = vec![b' '; MAX_MESSAGE + 10];
        immount_sys::mountd::send_with_fds(tx.socket().as_fd(), &big, &[]).unwrap_or(0);
        assert!(matches!(rx.read_message(), Err(ReadError::TooLarge)));
    }
}
