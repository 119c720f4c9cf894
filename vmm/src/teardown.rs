//! Handing the VM's teardown to a helper process, so that cove-vmm's exit is not delayed by it.
//!
//! Destroying a KVM VM is slow in places that have nothing to do with the guest: freeing the
//! in-kernel PIT waits for an SRCU grace period (8–33 ms measured on the development host, in
//! about half of all exits), and freeing guest memory takes time in proportion to what the guest
//! touched. The kernel does this work when the last reference to the VM goes, which is normally
//! inside the VMM's own exit, before whoever waits for the VMM learns that it ended.
//!
//! So, once the vCPUs have stopped, cove-vmm starts a child with `CLONE_VM` (it shares the
//! address space, so nothing is copied) that holds copies of every descriptor, the VM's among
//! them, and waits for its parent to be gone (`PR_SET_PDEATHSIG`). cove-vmm then exits at once;
//! the child's own exit drops the last references and the kernel destroys the VM there. If the
//! child cannot be started, the teardown simply happens in cove-vmm's exit, as before.

use std::ptr;

const STACK_BYTES: usize = 64 * 1024;

extern "C" fn hold_until_parent_exits(parent: *mut libc::c_void) -> libc::c_int {
    let parent = parent as libc::pid_t;
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and no pointers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // The parent may have exited before the death signal was armed.
    // SAFETY: getppid has no preconditions.
    while unsafe { libc::getppid() } == parent {
        // SAFETY: pause only blocks until a signal arrives; the death signal ends this process.
        unsafe { libc::pause() };
    }
    0
}

/// Starts the child that outlives this process and takes the VM's teardown with it.
pub fn hand_over() {
    // SAFETY: an anonymous private mapping with no address hint; the result is checked.
    let stack = unsafe {
        libc::mmap(
            ptr::null_mut(),
            STACK_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return;
    }
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the child runs `hold_until_parent_exits` on its own freshly mapped stack (the stack
    // grows down from its top), touches no memory it shares with this process except that stack,
    // and only makes system calls. Without CLONE_FILES it gets its own copy of the descriptor
    // table, so this process closing descriptors does not close the child's.
    unsafe {
        libc::clone(
            hold_until_parent_exits,
            stack.cast::<u8>().add(STACK_BYTES).cast(),
            libc::CLONE_VM | libc::SIGCHLD,
            parent as usize as *mut libc::c_void,
        )
    };
}
