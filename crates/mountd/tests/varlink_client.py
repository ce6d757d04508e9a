#!/usr/bin/env python3
"""A real varlink client against immountd: python's `varlink` package.

Usage: varlink_client.py SOCKET IMAGE MOUNTPOINT

1. GetInfo and GetInterfaceDescription through the package, which parses
   our interface definition with its own IDL parser.
2. MountImage through the package without descriptors (it cannot pass
   any): the typed error must come back as a VarlinkError.
3. MountImage with descriptors: the same wire format, framed by hand with
   socket.send_fds (the package has no SCM_RIGHTS support); the mount fd
   that comes back is attached with move_mount and read.
Prints one JSON object with what it saw; exits non-zero on any surprise.
"""
import ctypes
import json
import os
import socket
import sys

import varlink

sock_path, image, mountpoint = sys.argv[1:4]
out = {}

client = varlink.Client.new_with_address("unix:" + sock_path)
with client.open("org.varlink.service") as svc:
    info = svc.GetInfo()
    out["interfaces"] = list(info["interfaces"])
    out["product"] = info["product"]
    desc = svc.GetInterfaceDescription("io.immount.Mount")["description"]
    # The package's own parser must accept our IDL.
    iface = varlink.Interface(desc)
    out["parsed_interface"] = iface.name
    out["methods"] = sorted(iface.members.keys())

with client.open("io.immount.Mount") as mnt:
    try:
        mnt.MountImage(imageFileDescriptor=0)
        out["no_fd_call"] = "unexpected success"
    except varlink.VarlinkError as e:
        out["no_fd_call"] = e.error()

# MountImage with descriptors, as root in the initial user namespace
# (flow a: we may attach the detached mount ourselves).
img = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
ns = os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock_path)
call = {
    "method": "io.immount.Mount.MountImage",
    "parameters": {"imageFileDescriptor": 0, "userNamespaceFileDescriptor": 1},
}
socket.send_fds(s, [json.dumps(call).encode() + b"\0"], [img, ns])
data, fds, _, _ = socket.recv_fds(s, 65536, 4)
reply = json.loads(data.rstrip(b"\0"))
out["mount_reply"] = reply
if "error" in reply or len(fds) != 1:
    print(json.dumps(out))
    sys.exit(1)
libc = ctypes.CDLL(None, use_errno=True)
SYS_move_mount = 429
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
rc = libc.syscall(SYS_move_mount, fds[0], b"", AT_FDCWD, mountpoint.encode(), MOVE_MOUNT_F_EMPTY_PATH)
if rc != 0:
    out["move_mount_errno"] = ctypes.get_errno()
    print(json.dumps(out))
    sys.exit(1)
with open(os.path.join(mountpoint, "hello.txt")) as f:
    out["hello"] = f.read()
print(json.dumps(out))
