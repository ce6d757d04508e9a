//! The seccomp allowlist: exactly the syscalls that serving FUSE requests
//! needs, one a line, per architecture.
//!
//! Anything else is trapped (`SECCOMP_RET_TRAP`): the `SIGSYS` handler of
//! `immount_sys::sandbox` writes the syscall number to the log and the
//! process then dies by `SIGSYS`, so that [`crate::explain_exit`] can name the
//! syscall. A trapped syscall never runs, whatever the handler does.
//!
//! One program answers every syscall, laid out as a binary search on the
//! syscall number (a handful of comparisons whatever the number, instead of
//! one per allowed syscall in a linear list):
//! - the allowed syscalls: allow, some only when their arguments match;
//! - `clone3`: `ENOSYS`, so that glibc falls back to `clone`, whose flags
//!   (unlike `clone3`'s, behind a pointer) the program can inspect;
//! - anything else, and any other architecture's calling convention
//!   (`x32` numbers included): trapped (another architecture: killed).
//!
//! The argument checks themselves are seccompiler's rules; the layout is
//! ours because seccompiler emits a linear chain with a single match action.
//!
//! # Cost per syscall
//!
//! The syscalls of serving (`read` and `writev` on `/dev/fuse`, `pread64`,
//! `preadv2` and `fadvise64` on the image, `futex`) are allowed with any
//! arguments on purpose: for such a syscall the program's answer depends on
//! its number alone, which the kernel (5.11 and newer) works out once when
//! the filter is attached and keeps in a bitmap, so the BPF program never
//! runs for it. What remains is seccomp's slower syscall entry, tens of ns
//! a call (see `examples/syscall_cost.rs`). A syscall with argument checks
//! (`fcntl`, `mmap`, `mprotect`, `statx`) runs the program, which the binary
//! search keeps short; those are rare while serving. Working out the bitmap
//! runs the program once per syscall number at attach time, which the
//! binary search also keeps short (that is mount time). A strace of a cold read of a whole Debian tree
//! counted 68,000 syscalls, 900 of them with argument checks.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::SandboxError;

/// `_IOR(229, 0, uint32_t)`: clone a `/dev/fuse` session onto another fd.
pub(crate) const FUSE_DEV_IOC_CLONE: u64 = 0x8004_e500;

/// The syscall the `SIGSYS` handler makes to get itself killed: it must be
/// trapped unconditionally, which `socket` is ("socket creation denied in any
/// case"), even when a caller asks for extra syscalls.
pub(crate) const DIE_SYSCALL: i64 = libc::SYS_socket;

/// Syscalls allowed with any arguments.
#[cfg(target_arch = "x86_64")]
const ALLOWED: &[i64] = &[
    // Moving bytes on descriptors the server already holds (/dev/fuse, the
    // image, the log pipe).
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    // Read-ahead hints on the image (posix_fadvise).
    libc::SYS_fadvise64,
    // Waiting for requests.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    // Locks and condition variables.
    libc::SYS_futex,
    libc::SYS_sched_yield,
    // The allocator (mmap and mprotect are below, without PROT_EXEC).
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    // Signals: return from the SIGSYS handler's frame, masks, and the
    // alternate stack Rust sets up for its stack-overflow handler per thread.
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    // sigwait: the server's signal thread waits for SIGTERM/SIGINT/SIGHUP.
    libc::SYS_rt_sigtimedwait,
    // Resumes a sleep interrupted by a signal.
    libc::SYS_restart_syscall,
    // Time (normally the vDSO; the syscalls are its fallback).
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // HashMap seeds.
    libc::SYS_getrandom,
    // std::thread::available_parallelism.
    libc::SYS_sched_getaffinity,
    // Thread start-up and exit (glibc).
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Syscalls allowed with any arguments.
#[cfg(target_arch = "aarch64")]
const ALLOWED: &[i64] = &[
    // Moving bytes on descriptors the server already holds (/dev/fuse, the
    // image, the log pipe).
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    // Read-ahead hints on the image (posix_fadvise).
    libc::SYS_fadvise64,
    // Waiting for requests (aarch64 has no poll or epoll_wait).
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    // Locks and condition variables.
    libc::SYS_futex,
    libc::SYS_sched_yield,
    // The allocator (mmap and mprotect are below, without PROT_EXEC).
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    // Signals: return from the SIGSYS handler's frame, masks, and the
    // alternate stack Rust sets up for its stack-overflow handler per thread.
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    // sigwait: the server's signal thread waits for SIGTERM/SIGINT/SIGHUP.
    libc::SYS_rt_sigtimedwait,
    // Resumes a sleep interrupted by a signal.
    libc::SYS_restart_syscall,
    // Time (normally the vDSO; the syscalls are its fallback).
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // HashMap seeds.
    libc::SYS_getrandom,
    // std::thread::available_parallelism.
    libc::SYS_sched_getaffinity,
    // Thread start-up and exit (glibc).
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// `AUDIT_ARCH_X86_64`: `EM_X86_64` (62), 64-bit, little-endian.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_003E);

/// `AUDIT_ARCH_AARCH64`: `EM_AARCH64` (183), 64-bit, little-endian.
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_00B7);

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ALLOWED: &[i64] = &[];

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH: Option<u32> = None;

/// Name of the architecture the filter is built for.
pub(crate) const ARCH: &str = std::env::consts::ARCH;

/// The built program and what it holds, for the report.
#[derive(Debug)]
pub(crate) struct Filters {
    /// The BPF program.
    pub program: Vec<libc::sock_filter>,
    /// Syscalls allowed, some only with given arguments (and `clone3`,
    /// answered `ENOSYS`).
    pub syscalls: usize,
    /// Syscalls allowed only with some argument values.
    pub conditional: usize,
    /// The instruction comparing `tgkill`'s first argument with our own
    /// pid (`None` when an extra syscall widened `tgkill` to any
    /// arguments), so that a program built before a fork can name the pid
    /// of the child that installs it.
    pid_at: Option<usize>,
}

/// Stands for the server's pid in a program built before its fork: above
/// `PID_MAX_LIMIT` (2^22), so never a real pid, and used by no other rule
/// (`build_for_any_pid` checks it appears once).
const PID_PLACEHOLDER: u32 = 0x7fff_fffe;

impl Filters {
    /// Makes the `tgkill` rule name `pid` (the process that installs the
    /// program).
    pub(crate) fn set_pid(&mut self, pid: u32) {
        if let Some(at) = self.pid_at {
            self.program[at].k = pid;
        }
    }
}

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompRule, SandboxError> {
    cond_all(vec![(arg, len, op, value)])
}

fn cond_all(
    conds: Vec<(u8, SeccompCmpArgLen, SeccompCmpOp, u64)>,
) -> Result<SeccompRule, SandboxError> {
    let conds = conds
        .into_iter()
        .map(|(arg, len, op, value)| SeccompCondition::new(arg, len, op, value))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    SeccompRule::new(conds).map_err(|e| SandboxError::Seccomp(e.to_string()))
}

fn u64_of(v: libc::c_int) -> u64 {
    // Flags and command numbers are small non-negative constants.
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// The syscalls allowed only with some arguments: `(syscall, rules)`, where
/// the syscall is allowed if any rule matches and a rule matches if all its
/// conditions do.
fn conditional_rules(
    allow_threads: bool,
    own_pid: u32,
) -> Result<Vec<(i64, Vec<SeccompRule>)>, SandboxError> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq};
    let prot_exec = u64_of(libc::PROT_EXEC);
    let at_empty_path = u64_of(libc::AT_EMPTY_PATH);
    let mut rules = vec![
        // ioctl only to clone a FUSE session (the request is an int: compare
        // the low 32 bits so that a sign-extended value matches too).
        (
            libc::SYS_ioctl,
            vec![cond(1, Dword, Eq, FUSE_DEV_IOC_CLONE)?],
        ),
        // fcntl for descriptor flags (O_NONBLOCK, FD_CLOEXEC) and
        // F_DUPFD_CLOEXEC; no locks, no leases, no owner/signal changes.
        (
            libc::SYS_fcntl,
            [
                libc::F_GETFD,
                libc::F_SETFD,
                libc::F_GETFL,
                libc::F_SETFL,
                libc::F_DUPFD_CLOEXEC,
            ]
            .into_iter()
            .map(|cmd| cond(1, Dword, Eq, u64_of(cmd)))
            .collect::<Result<_, _>>()?,
        ),
        // prctl only to name threads.
        (
            libc::SYS_prctl,
            [libc::PR_SET_NAME, libc::PR_GET_NAME]
                .into_iter()
                .map(|op| cond(0, Dword, Eq, u64_of(op)))
                .collect::<Result<_, _>>()?,
        ),
        // Memory, never executable: no new code can be mapped.
        (
            libc::SYS_mmap,
            vec![cond(2, Dword, MaskedEq(prot_exec), 0)?],
        ),
        (
            libc::SYS_mprotect,
            vec![cond(2, Dword, MaskedEq(prot_exec), 0)?],
        ),
        // stat only of a descriptor: AT_EMPTY_PATH (Rust's File::metadata
        // uses statx(fd, "", AT_EMPTY_PATH)). A path would only reach the
        // empty root anyway.
        (
            libc::SYS_statx,
            vec![cond(2, Dword, MaskedEq(at_empty_path), at_empty_path)?],
        ),
        (
            libc::SYS_newfstatat,
            vec![cond(3, Dword, MaskedEq(at_empty_path), at_empty_path)?],
        ),
        // Reading a signal disposition (Rust's runtime looks at the SIGSEGV
        // and SIGBUS handlers when a thread starts), and setting glibc's two
        // internal signals, which its first pthread_create installs:
        // SIGCANCEL (32) and SIGSETXID (33), the kernel's SIGRTMIN and +1.
        // No other handler can change, the SIGSYS reporter included.
        (
            libc::SYS_rt_sigaction,
            vec![
                cond(1, Qword, Eq, 0)?,
                cond(0, Dword, Eq, 32)?,
                cond(0, Dword, Eq, 33)?,
            ],
        ),
        // Signals only to our own threads (abort() raises SIGABRT this way).
        (
            libc::SYS_tgkill,
            vec![cond(0, Dword, Eq, u64::from(own_pid))?],
        ),
    ];
    if allow_threads {
        // clone only for threads: CLONE_THREAD, CLONE_VM and CLONE_SIGHAND
        // set and no namespace flag. A new process needs CLONE_THREAD clear.
        let thread = u64_of(libc::CLONE_THREAD | libc::CLONE_VM | libc::CLONE_SIGHAND);
        let namespaces = u64_of(
            libc::CLONE_NEWNS
                | libc::CLONE_NEWUTS
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWUSER
                | libc::CLONE_NEWPID
                | libc::CLONE_NEWNET
                | libc::CLONE_NEWCGROUP,
        );
        rules.push((
            libc::SYS_clone,
            vec![cond(0, Qword, MaskedEq(thread | namespaces), thread)?],
        ));
    }
    Ok(rules)
}

/// The syscalls allowed and their rules (empty: any arguments), with
/// `clone3` in it, and how many of them have rules.
fn rule_map(
    allow_threads: bool,
    extra: &[i64],
    own_pid: u32,
) -> Result<(BTreeMap<i64, Vec<SeccompRule>>, usize), SandboxError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in ALLOWED.iter().chain(extra) {
        if nr == DIE_SYSCALL {
            return Err(SandboxError::Config(
                "socket() cannot be allowed: the sandbox denies it in any case".into(),
            ));
        }
        map.insert(nr, Vec::new());
    }
    // Answered ENOSYS by the program (see the module docs).
    map.insert(libc::SYS_clone3, Vec::new());
    let mut conditional = 0;
    for (nr, rules) in conditional_rules(allow_threads, own_pid)? {
        // An extra that names a conditional syscall widens it to any
        // arguments, as asked.
        if let std::collections::btree_map::Entry::Vacant(slot) = map.entry(nr) {
            slot.insert(rules);
            conditional += 1;
        }
    }
    Ok((map, conditional))
}

// Classic BPF opcodes (linux/bpf_common.h) and seccomp_data offsets.
/// `BPF_LD | BPF_W | BPF_ABS` (the first two are 0).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// Linux accepts at most this many instructions (BPF_MAXINSNS).
const MAX_INSTRUCTIONS: usize = 4096;
/// Syscall numbers compared one by one at the bottom of the search.
const LEAF_SIZE: usize = 4;

const fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Where a search leaf sends a syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Allow,
    Enosys,
    Trap,
    /// The argument checks of the n-th conditional syscall.
    Rules(usize),
}

/// An instruction, or a jump to a target placed later.
enum Op {
    Ins(libc::sock_filter),
    Goto(Target),
    /// `JEQ nr`: to `on_match` when equal, else to `otherwise` (`None`: the
    /// next instruction). One instruction instead of a `JEQ` and a `JA`,
    /// but its offsets must fit in a byte: used for the three answers
    /// placed right after the search, when the search is short enough.
    Branch {
        nr: u32,
        on_match: Target,
        otherwise: Option<Target>,
    },
}

fn too_big(what: &str) -> SandboxError {
    SandboxError::Seccomp(format!("the BPF program is too large ({what})"))
}

/// The binary search over `entries` (sorted by number), the syscall number
/// in the accumulator: `JGE` on the middle number, the upper half first.
/// A leaf jumps straight to the answers after the search (see
/// [`Op::Branch`]), which keeps the program about a third shorter: the
/// kernel's work to attach it (translating and compiling it) grows with
/// its length, and that work is on the mount's path.
fn search(entries: &[(u32, Target)]) -> Result<Vec<Op>, SandboxError> {
    if entries.len() <= LEAF_SIZE {
        let mut ops = Vec::with_capacity(entries.len() * 2 + 1);
        let direct = |target: Target| !matches!(target, Target::Rules(_));
        for (i, &(nr, target)) in entries.iter().enumerate() {
            let last = i + 1 == entries.len();
            if direct(target) && last {
                ops.push(Op::Branch {
                    nr,
                    on_match: target,
                    otherwise: Some(Target::Trap),
                });
                return Ok(ops);
            }
            if direct(target) {
                ops.push(Op::Branch {
                    nr,
                    on_match: target,
                    otherwise: None,
                });
            } else {
                ops.push(Op::Ins(jump(BPF_JMP_JEQ_K, nr, 0, 1)));
                ops.push(Op::Goto(target));
            }
        }
        ops.push(Op::Goto(Target::Trap));
        return Ok(ops);
    }
    let mid = entries.len() / 2;
    let upper = search(&entries[mid..])?;
    let lower = search(&entries[..mid])?;
    let skip = u8::try_from(upper.len()).map_err(|_| too_big("search tree"))?;
    let mut ops = Vec::with_capacity(1 + upper.len() + lower.len());
    ops.push(Op::Ins(jump(BPF_JMP_JGE_K, entries[mid].0, 0, skip)));
    ops.extend(upper);
    ops.extend(lower);
    Ok(ops)
}

/// Lays out the program: architecture check, syscall number, search, the
/// three answers, then the argument checks of the conditional syscalls.
fn assemble(
    audit_arch: u32,
    map: BTreeMap<i64, Vec<SeccompRule>>,
) -> Result<Vec<libc::sock_filter>, SandboxError> {
    let mut blocks: Vec<Vec<libc::sock_filter>> = Vec::new();
    let mut entries = Vec::with_capacity(map.len());
    for (nr, rules) in map {
        let nr = u32::try_from(nr)
            .map_err(|_| SandboxError::Config(format!("syscall number {nr} out of range")))?;
        let target = if i64::from(nr) == libc::SYS_clone3 {
            Target::Enosys
        } else if rules.is_empty() {
            Target::Allow
        } else {
            // seccompiler's rule code falls through to the next instruction
            // when its conditions hold and jumps just past that instruction
            // when they do not: each rule is followed by "allow", and the
            // block ends with "trap".
            let mut block = Vec::new();
            for rule in rules {
                let bpf: BpfProgram = rule.into();
                block.extend(bpf.iter().map(|i| jump(i.code, i.k, i.jt, i.jf)));
                block.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW));
            }
            block.push(stmt(BPF_RET_K, libc::SECCOMP_RET_TRAP));
            // Each seccompiler rule opens with an unreachable jump to one
            // past the instruction after it, which the kernel's checker still
            // wants inside the program: a second "trap" gives it a target.
            block.push(stmt(BPF_RET_K, libc::SECCOMP_RET_TRAP));
            blocks.push(block);
            Target::Rules(blocks.len() - 1)
        };
        entries.push((nr, target));
    }
    let mut ops = vec![
        Op::Ins(stmt(BPF_LD_W_ABS, DATA_ARCH)),
        Op::Ins(jump(BPF_JMP_JEQ_K, audit_arch, 1, 0)),
        Op::Ins(stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS)),
        Op::Ins(stmt(BPF_LD_W_ABS, DATA_NR)),
    ];
    // Every leaf reaches the answers in a one-byte jump, or the program
    // is refused as too large (see `Op::Branch`).
    ops.extend(search(&entries)?);
    let allow_at = ops.len();
    let enosys_at = allow_at + 1;
    let trap_at = allow_at + 2;
    let mut block_at = Vec::with_capacity(blocks.len());
    let mut end = trap_at + 1;
    for block in &blocks {
        block_at.push(end);
        end += block.len();
    }
    if end > MAX_INSTRUCTIONS {
        return Err(too_big(&format!("{end} instructions")));
    }
    let errno = u32::try_from(libc::ENOSYS).unwrap_or(38);
    let mut program = Vec::with_capacity(end);
    let place = |target: Target| match target {
        Target::Allow => allow_at,
        Target::Enosys => enosys_at,
        Target::Trap => trap_at,
        Target::Rules(n) => block_at[n],
    };
    for (at, op) in ops.into_iter().enumerate() {
        // Forward only: every target lies after the search.
        let offset = |target: Target| place(target) - at - 1;
        program.push(match op {
            Op::Ins(ins) => ins,
            Op::Goto(target) => {
                let offset = u32::try_from(offset(target)).map_err(|_| too_big("jump"))?;
                stmt(BPF_JMP_JA, offset)
            }
            Op::Branch {
                nr,
                on_match,
                otherwise,
            } => {
                let short = |offset: usize| u8::try_from(offset).map_err(|_| too_big("branch"));
                let jt = short(offset(on_match))?;
                let jf = match otherwise {
                    Some(target) => short(offset(target))?,
                    None => 0,
                };
                jump(BPF_JMP_JEQ_K, nr, jt, jf)
            }
        });
    }
    program.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW));
    program.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ERRNO | errno));
    program.push(stmt(BPF_RET_K, libc::SECCOMP_RET_TRAP));
    for block in blocks {
        program.extend(block);
    }
    Ok(program)
}

/// Builds the program for process `own_pid`.
#[cfg(test)]
pub(crate) fn build(
    allow_threads: bool,
    extra: &[i64],
    own_pid: u32,
) -> Result<Filters, SandboxError> {
    let mut filters = build_for_any_pid(allow_threads, extra)?;
    filters.set_pid(own_pid);
    Ok(filters)
}

/// Builds the program with the pid left open: [`Filters::set_pid`] fills
/// it in, in the process that installs it. (Building takes tens of µs,
/// which the sandbox spends before the fork, off the mount's path.)
pub(crate) fn build_for_any_pid(
    allow_threads: bool,
    extra: &[i64],
) -> Result<Filters, SandboxError> {
    let audit_arch = AUDIT_ARCH.ok_or(SandboxError::UnsupportedArch(ARCH))?;
    let (map, conditional) = rule_map(allow_threads, extra, PID_PLACEHOLDER)?;
    let syscalls = map.len();
    let program = assemble(audit_arch, map)?;
    let mut slots = program
        .iter()
        .enumerate()
        .filter(|(_, ins)| ins.code == BPF_JMP_JEQ_K && ins.k == PID_PLACEHOLDER)
        .map(|(at, _)| at);
    let pid_at = slots.next();
    if slots.next().is_some() {
        return Err(SandboxError::Seccomp(
            "the pid placeholder appears twice in the program".into(),
        ));
    }
    Ok(Filters {
        program,
        syscalls,
        conditional,
        pid_at,
    })
}

/// Installs the program on every thread of the process (TSYNC), with
/// `SECCOMP_FILTER_FLAG_SPEC_ALLOW`: Speculative Store Bypass only leaks
/// memory of the process itself, which holds nothing a compromised server
/// does not already read, so seccomp must not force its costly mitigation
/// (as a kernel booted with `spec_store_bypass_disable=seccomp` does).
/// Returns whether the kernel took the flag.
pub(crate) fn install(filters: &Filters) -> Result<bool, SandboxError> {
    immount_sys::sandbox::install_seccomp_filter(&filters.program, true)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};

    const BPF_ALU_AND_K: u16 = 0x04 | 0x50;
    const BPF_JMP_JGT_K: u16 = 0x05 | 0x20;
    const BPF_JMP_JSET_K: u16 = 0x05 | 0x40;

    /// A classic BPF interpreter for the instructions seccomp filters use;
    /// returns the filter's answer and the instructions it ran.
    fn run(program: &[libc::sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> (u32, usize) {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, arg) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&arg.to_le_bytes());
        }
        let (mut a, mut pc, mut steps) = (0u32, 0usize, 0usize);
        loop {
            let ins = program[pc];
            steps += 1;
            let k = ins.k as usize;
            let cond = |taken: bool| usize::from(if taken { ins.jt } else { ins.jf });
            pc += 1 + match ins.code {
                BPF_LD_W_ABS => {
                    a = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                    0
                }
                BPF_ALU_AND_K => {
                    a &= ins.k;
                    0
                }
                BPF_JMP_JA => k,
                BPF_JMP_JEQ_K => cond(a == ins.k),
                BPF_JMP_JGT_K => cond(a > ins.k),
                BPF_JMP_JGE_K => cond(a >= ins.k),
                BPF_JMP_JSET_K => cond(a & ins.k != 0),
                BPF_RET_K => return (ins.k, steps),
                other => panic!("instruction {other:#x} not interpreted"),
            };
        }
    }

    /// The kernel's checks on a classic BPF program (bpf_check_classic):
    /// every jump, taken or not, reachable or not, lands inside the program,
    /// and the last instruction returns.
    fn check_like_the_kernel(program: &[libc::sock_filter]) {
        let len = program.len();
        assert!(len > 0 && len <= MAX_INSTRUCTIONS);
        for (pc, ins) in program.iter().enumerate() {
            match ins.code {
                BPF_JMP_JA => assert!((ins.k as usize) < len - pc - 1, "JA at {pc} leaves"),
                BPF_JMP_JEQ_K | BPF_JMP_JGE_K | BPF_JMP_JGT_K | BPF_JMP_JSET_K => {
                    let far = usize::from(ins.jt.max(ins.jf));
                    assert!(pc + far + 1 < len, "jump at {pc} leaves the program");
                }
                BPF_LD_W_ABS => assert!(ins.k % 4 == 0 && ins.k < 64, "load at {pc}"),
                BPF_RET_K | BPF_ALU_AND_K => {}
                other => panic!("instruction {other:#x} at {pc} not allowed by seccomp"),
            }
        }
        assert_eq!(
            program[len - 1].code,
            BPF_RET_K,
            "the program must end in a return"
        );
    }

    fn seccompiler_program(filter: SeccompFilter) -> Vec<libc::sock_filter> {
        let bpf: BpfProgram = filter.try_into().expect("seccompiler builds");
        bpf.iter().map(|i| jump(i.code, i.k, i.jt, i.jf)).collect()
    }

    /// The kernel keeps the strictest answer of stacked filters: the lowest
    /// action as a signed number (KILL_PROCESS first, ALLOW last).
    fn strictest(a: u32, b: u32) -> u32 {
        let rank = |v: u32| (v & libc::SECCOMP_RET_ACTION_FULL) as i32;
        if rank(a) <= rank(b) {
            a
        } else {
            b
        }
    }

    /// Our binary-search program answers exactly as the two seccompiler
    /// filters it replaced (a linear allowlist, and clone3 → ENOSYS) for
    /// every syscall number and many argument values, in few instructions.
    #[test]
    fn binary_search_program_answers_like_the_linear_seccompiler_filters() {
        let arch = AUDIT_ARCH.expect("a supported architecture");
        let target = if cfg!(target_arch = "aarch64") {
            TargetArch::aarch64
        } else {
            TargetArch::x86_64
        };
        let own_pid = 4242;
        for allow_threads in [true, false] {
            let ours = build(allow_threads, &[], own_pid).expect("builds").program;
            check_like_the_kernel(&ours);
            let (map, _) = rule_map(allow_threads, &[], own_pid).expect("rules");
            let linear = seccompiler_program(
                SeccompFilter::new(map, SeccompAction::Trap, SeccompAction::Allow, target)
                    .expect("filter"),
            );
            let mut clone3 = BTreeMap::new();
            clone3.insert(libc::SYS_clone3, Vec::new());
            let clone3 = seccompiler_program(
                SeccompFilter::new(
                    clone3,
                    SeccompAction::Allow,
                    SeccompAction::Errno(libc::ENOSYS as u32),
                    target,
                )
                .expect("filter"),
            );
            // Argument values that the rules look at, and others.
            let values: Vec<u64> = vec![
                0,
                1,
                2,
                32,
                33,
                u64::from(own_pid),
                u64_of(libc::PROT_READ | libc::PROT_WRITE),
                u64_of(libc::PROT_READ | libc::PROT_EXEC),
                u64_of(libc::AT_EMPTY_PATH),
                u64_of(libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW),
                FUSE_DEV_IOC_CLONE,
                FUSE_DEV_IOC_CLONE | 0xffff_ffff_0000_0000,
                u64_of(libc::F_GETFL),
                u64_of(libc::F_SETLK),
                u64_of(libc::F_DUPFD_CLOEXEC),
                u64_of(libc::PR_SET_NAME),
                u64_of(libc::PR_SET_SECCOMP),
                u64_of(libc::CLONE_THREAD | libc::CLONE_VM | libc::CLONE_SIGHAND),
                u64_of(
                    libc::CLONE_THREAD | libc::CLONE_VM | libc::CLONE_SIGHAND | libc::CLONE_NEWNET,
                ),
                u64_of(libc::CLONE_VM | libc::SIGCHLD),
                u64::MAX,
                0x1_0000_0000,
            ];
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let mut pick = || {
                // xorshift: reproducible, no dependency.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                values[(seed % values.len() as u64) as usize]
            };
            let mut longest = 0;
            for nr in (0..520u32).chain([0x4000_0000, 0x4000_0001, u32::MAX]) {
                for _ in 0..64 {
                    let args = [pick(), pick(), pick(), pick(), pick(), pick()];
                    let (got, steps) = run(&ours, arch, nr, args);
                    let want = strictest(
                        run(&clone3, arch, nr, args).0,
                        run(&linear, arch, nr, args).0,
                    );
                    assert_eq!(got, want, "syscall {nr} args {args:x?}");
                    if !conditional_rules(allow_threads, own_pid)
                        .unwrap()
                        .iter()
                        .any(|(n, _)| *n == i64::from(nr))
                    {
                        longest = longest.max(steps);
                    }
                }
            }
            // A number costs a few comparisons, not one per syscall.
            assert!(
                longest <= 16,
                "{longest} instructions for one syscall number"
            );
            // Another architecture's calling convention is killed.
            let (other, _) = run(&ours, arch ^ 1, libc::SYS_read as u32, [0; 6]);
            assert_eq!(other, libc::SECCOMP_RET_KILL_PROCESS);
        }
    }

    /// A program built before the fork and given its pid afterwards is the
    /// program built with that pid, and the rule then allows `tgkill` to
    /// that pid only.
    #[test]
    fn the_pid_filled_in_later_is_the_pid_built_in() {
        let arch = AUDIT_ARCH.expect("a supported architecture");
        for allow_threads in [true, false] {
            let mut later = build_for_any_pid(allow_threads, &[]).expect("builds");
            assert!(later.pid_at.is_some(), "tgkill names the pid");
            later.set_pid(4242);
            let (map, _) = rule_map(allow_threads, &[], 4242).expect("rules");
            let direct = assemble(arch, map).expect("assembles");
            let fields = |p: &[libc::sock_filter]| -> Vec<(u16, u8, u8, u32)> {
                p.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect()
            };
            assert_eq!(fields(&later.program), fields(&direct));
            let tgkill = libc::SYS_tgkill as u32;
            let (own, _) = run(&later.program, arch, tgkill, [4242, 1, 6, 0, 0, 0]);
            assert_eq!(own, libc::SECCOMP_RET_ALLOW);
            let (other, _) = run(&later.program, arch, tgkill, [4243, 1, 6, 0, 0, 0]);
            assert_eq!(other, libc::SECCOMP_RET_TRAP);
            let (placeholder, _) = run(
                &later.program,
                arch,
                tgkill,
                [u64::from(PID_PLACEHOLDER), 1, 6, 0, 0, 0],
            );
            assert_eq!(placeholder, libc::SECCOMP_RET_TRAP);
        }
        // tgkill widened to any arguments: no pid to fill in.
        let wide = build_for_any_pid(true, &[libc::SYS_tgkill]).expect("builds");
        assert_eq!(wide.pid_at, None);
    }

    /// The leaves of the search reach the answers without a `JA`; a list
    /// too long for one-byte jumps is refused with an error.
    #[test]
    fn compact_layout() {
        let default = build(true, &[], 7).expect("builds");
        // The search: from the syscall number's load to the first answer.
        let end = default
            .program
            .iter()
            .position(|i| i.code == BPF_RET_K && i.k == libc::SECCOMP_RET_ALLOW)
            .expect("an allow");
        let jas = default.program[4..end]
            .iter()
            .filter(|i| i.code == BPF_JMP_JA)
            .count();
        // Only the leaves of conditional syscalls jump with a JA (to their
        // rules, and to "trap" after such a leaf).
        assert!(jas <= 2 * default.conditional, "{jas} JA instructions");
        // 263 with a JEQ and a JA per leaf entry.
        assert!(
            default.program.len() < 230,
            "{} instructions",
            default.program.len()
        );
        let many: Vec<i64> = (0..450)
            .filter(|&nr| nr != DIE_SYSCALL && !default_allows(nr))
            .collect();
        let err = build(true, &many, 7).expect_err("too many for one-byte jumps");
        assert!(err.to_string().contains("too large"), "{err}");
    }

    fn default_allows(nr: i64) -> bool {
        ALLOWED.contains(&nr)
            || nr == libc::SYS_clone3
            || conditional_rules(true, 7)
                .expect("rules")
                .iter()
                .any(|(n, _)| *n == nr)
    }

    #[test]
    fn socket_is_never_allowed() {
        assert!(!ALLOWED.contains(&DIE_SYSCALL));
        assert!(build(true, &[libc::SYS_socket], 1).is_err());
    }

    #[test]
    fn dangerous_syscalls_are_absent() {
        for nr in [
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_kill,
            libc::SYS_rt_sigaction,
            libc::SYS_setns,
            libc::SYS_unshare,
        ] {
            assert!(!ALLOWED.contains(&nr), "syscall {nr} must not be allowed");
        }
    }

    /// The hot syscalls of serving must stay unconditional: the kernel's
    /// seccomp cache then answers them without running the BPF program
    /// (see the module docs), which an argument check would undo.
    #[test]
    fn hot_syscalls_are_allowed_without_argument_checks() {
        let conditional: Vec<i64> = conditional_rules(true, 1)
            .expect("rules build")
            .into_iter()
            .map(|(nr, _)| nr)
            .collect();
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_pread64,
            libc::SYS_preadv2,
            libc::SYS_fadvise64,
            libc::SYS_futex,
            libc::SYS_epoll_pwait,
            libc::SYS_madvise,
            libc::SYS_munmap,
        ] {
            assert!(ALLOWED.contains(&nr), "hot syscall {nr} not allowed");
            assert!(
                !conditional.contains(&nr),
                "hot syscall {nr} has argument checks"
            );
        }
    }

    #[test]
    fn filters_build() {
        let f = build(true, &[], 1).expect("filters build");
        assert!(!f.program.is_empty());
        // The allowlist, clone3 (answered ENOSYS by the other filter) and
        // the conditional ones.
        assert_eq!(f.syscalls, ALLOWED.len() + 1 + f.conditional);
        let without_threads = build(false, &[], 1).expect("filters build");
        assert_eq!(without_threads.conditional + 1, f.conditional);
    }
}
