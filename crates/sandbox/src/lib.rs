//! The backends' sandbox: once set-up is done (listening socket bound,
//! images opened), a daemon installs a seccomp allow-list on all of its
//! threads and sets `no_new_privs`. A call outside the list fails with
//! EPERM: a compromised device model cannot execute programs, open files
//! for writing, create network sockets, trace or signal other processes.
//!
//! The lists were taken from `strace -f` of every documented command
//! (demo, frontends over doorbells and in-band, vhost-user with a Linux
//! guest in both memory modes) and are checked by running those commands
//! sandboxed in the test suite and CI.

use std::collections::BTreeMap;

use seccompiler::{
    apply_filter_all_threads, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp,
    SeccompCondition, SeccompFilter, SeccompRule,
};

/// Which daemon is being sandboxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `ringfence backend`: virtio-msg over the local bus.
    Backend,
    /// `ringfence vhost-user`: rust-vmm's vhost-user-backend, which binds a
    /// new listening socket for every frontend and runs epoll loops.
    VhostUser,
}

/// What the served devices need beyond a profile's list (decided by the
/// daemon from the devices it serves, so a blk-only daemon keeps the
/// smallest list).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extras {
    /// timerfds (a rate-limited rng).
    pub timers: bool,
    /// epoll instances (vsock's connection set).
    pub epoll: bool,
    /// Connecting Unix stream sockets (vsock's guest connects reach
    /// `<uds>_<port>`).
    pub unix_connect: bool,
    /// Grants for copy: connecting to the broker, learning the frontend's
    /// process id (`SO_PEERCRED`) and creating staging memory (a memfd).
    pub broker: bool,
    /// Creating shared memory per session (the ivshmem server).
    pub memfd: bool,
    /// io_uring (virtio-blk with `--aio io_uring`): `io_uring_enter` only.
    /// Ring operations run in the kernel past this filter, so the rings are
    /// made before the filter is installed, restricted to reads, writes and
    /// syncs of the image; `io_uring_setup` stays forbidden, or code that
    /// took over the process could make an unrestricted one.
    pub io_uring: bool,
}

/// The sandbox could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// prctl(PR_SET_NO_NEW_PRIVS) failed.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    /// The filter could not be installed.
    #[error("seccomp filter")]
    Seccomp(#[from] seccompiler::Error),
    /// A rule or the filter could not be built.
    #[error("seccomp rule")]
    Rule(#[from] seccompiler::BackendError),
    /// This architecture has no allow-list.
    #[error("no seccomp allow-list for architecture {0}")]
    Arch(&'static str),
}

/// System calls every daemon needs after set-up, unconditionally.
const COMMON: &[libc::c_long] = &[
    // Memory, threads, synchronisation.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_prctl, // thread names
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction, // glibc sets up its internal signals on first thread start
    libc::SYS_rt_sigreturn,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall, // a sleep interrupted by SIGTERM/SIGINT resumes
    libc::SYS_getcwd,          // panic messages
    // Descriptors: messages, doorbells, images.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv2,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_fstatfs, // a memfd from a peer must be shmem, not hugetlbfs
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    // Doorbell checks read /proc/self/fd links and fdinfo (opened read-only, below).
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    // The listening socket's path is removed at exit.
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_ioctl, // isatty for log colours
];

/// Extra calls of vhost-user-backend's per-connection listener and epoll loops.
const VHOST_USER: &[libc::c_long] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    // The early-enable shim links to the daemon over an abstract Unix
    // socket (socket() stays Unix-only).
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
];

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    Ok(SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        op,
        value,
    )?)
}

/// The rules of `profile`: syscall number to the conditions under which it is allowed.
pub fn rules(profile: Profile) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    rules_with(profile, Extras::default())
}

/// The rules of `profile` plus what `extras` needs.
pub fn rules_with(
    profile: Profile,
    extras: Extras,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|&n| (n, Vec::new())).collect();
    // openat: read-only opens only (flags & O_ACCMODE == O_RDONLY).
    rules.insert(
        libc::SYS_openat,
        vec![SeccompRule::new(vec![condition(
            2,
            SeccompCmpOp::MaskedEq(libc::O_ACCMODE as u64),
            libc::O_RDONLY as u64,
        )?])?],
    );
    if extras.timers {
        rules.extend(
            [
                libc::SYS_timerfd_create,
                libc::SYS_timerfd_settime,
                libc::SYS_timerfd_gettime,
            ]
            .map(|n| (n, Vec::new())),
        );
    }
    if extras.epoll {
        rules.extend(
            [
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
            ]
            .map(|n| (n, Vec::new())),
        );
    }
    if extras.unix_connect || extras.broker {
        rules.insert(libc::SYS_connect, Vec::new());
    }
    if extras.io_uring {
        rules.insert(libc::SYS_io_uring_enter, Vec::new());
    }
    if extras.broker || extras.memfd {
        rules.extend([libc::SYS_memfd_create, libc::SYS_ftruncate].map(|n| (n, Vec::new())));
    }
    if extras.broker {
        // SO_PEERCRED only (the frontend's process id), not any option.
        if profile != Profile::VhostUser {
            rules.insert(
                libc::SYS_getsockopt,
                vec![SeccompRule::new(vec![
                    condition(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64)?,
                    condition(2, SeccompCmpOp::Eq, libc::SO_PEERCRED as u64)?,
                ])?],
            );
        }
    }
    if profile == Profile::VhostUser || extras.unix_connect || extras.broker {
        if profile == Profile::VhostUser {
            rules.extend(VHOST_USER.iter().map(|&n| (n, Vec::new())));
        }
        // socket: Unix sockets only.
        rules.insert(
            libc::SYS_socket,
            vec![SeccompRule::new(vec![condition(
                0,
                SeccompCmpOp::Eq,
                libc::AF_UNIX as u64,
            )?])?],
        );
    }
    Ok(rules)
}

/// Builds the filter of `profile`: allowed calls pass, anything else fails with EPERM.
pub fn filter(profile: Profile) -> Result<BpfProgram, SandboxError> {
    filter_with(profile, Extras::default())
}

/// Builds the filter of `profile` plus `extras`.
pub fn filter_with(profile: Profile, extras: Extras) -> Result<BpfProgram, SandboxError> {
    let arch = std::env::consts::ARCH;
    let target = arch.try_into().map_err(|_| SandboxError::Arch(arch))?;
    let filter = SeccompFilter::new(
        rules_with(profile, extras)?,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        target,
    )?;
    Ok(filter.try_into()?)
}

/// Sets `no_new_privs` and installs the filter of `profile` on every thread
/// of the process. Returns the number of system calls allowed.
pub fn install(profile: Profile) -> Result<usize, SandboxError> {
    install_with(profile, Extras::default())
}

/// Like [`install`], with the calls `extras` needs.
pub fn install_with(profile: Profile, extras: Extras) -> Result<usize, SandboxError> {
    let program = filter_with(profile, extras)?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    apply_filter_all_threads(&program)?;
    Ok(rules_with(profile, extras)?.len())
}
