/* syscall-inject PID [dm-op DOMID]: the next system call any thread of process PID makes
 * becomes socket(AF_INET, SOCK_STREAM, 0), as if code a guest had taken over in that process
 * made it; with `dm-op DOMID`, it becomes a device-model operation on domain DOMID through the
 * process's own /dev/xen/privcmd handle (ioctl IOCTL_PRIVCMD_DM_OP, no operation in it: the
 * kernel refuses a handle restricted to another domain before looking further).
 * For the sandbox checks of the service and hvm scenarios: the vtpm's own filter must kill it
 * (SIGSYS); if it does not, the call's result is printed.
 * It works with ptrace: each thread is stopped at its next system-call entry, the call is
 * rewritten there, and the kernel checks the seccomp filter after that stop (Linux 4.8+). A
 * filter's kill skips the call and delivers SIGSYS on its way back, so the call's exit stop
 * still comes: whether the process survived is only known by waiting (10 s). Prints what it
 * did and how the process ended; exit status 0 if SIGSYS killed it, else 1. x86-64 only. */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stdint.h>
#include <sys/ioctl.h>

/* Linux's struct privcmd_dm_op and its ioctl (uapi xen/privcmd.h, which needs kernel-only
 * headers; the xen crate's tests check the same layout against libxen-dev). */
struct dm_op_arg {
    uint16_t dom, num;
    const void *ubufs;
};
#define DM_OP_IOCTL _IOC(_IOC_NONE, 'P', 5, sizeof(struct dm_op_arg))

static void survived(int sig) {
    (void)sig;
    static const char msg[] = "process survived the call\n";
    write(1, msg, sizeof msg - 1);
    _exit(1); /* our exit detaches the threads */
}

int main(int argc, char **argv) {
    int dmop = argc == 4 && strcmp(argv[2], "dm-op") == 0;
    if (argc != 2 && !dmop) {
        fprintf(stderr, "usage: syscall-inject PID [dm-op DOMID]\n");
        return 2;
    }
    int pid = atoi(argv[1]), traced = 0, injected = 0, killed = 0, privcmd = -1;
    if (dmop) {
        /* The process's privcmd handle: its number in /proc/PID/fd. */
        char dir[64], link[320], to[64];
        snprintf(dir, sizeof dir, "/proc/%d/fd", pid);
        DIR *fds = opendir(dir);
        for (struct dirent *e; fds && (e = readdir(fds));) {
            snprintf(link, sizeof link, "%s/%s", dir, e->d_name);
            ssize_t n = readlink(link, to, sizeof to - 1);
            /* (A sandboxed process's root no longer shows /dev: the link names the device
             * relative to its file system, e.g. /xen/privcmd.) */
            if (n > 8 && (to[n] = 0, strcmp(to + n - 8, "/privcmd") == 0)) {
                privcmd = atoi(e->d_name);
                printf("fd %d is %s\n", privcmd, to);
            }
        }
        if (fds) closedir(fds);
        if (privcmd < 0) {
            fprintf(stderr, "process %d holds no privcmd handle\n", pid);
            return 1;
        }
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGALRM, survived);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *d = opendir(path);
    if (!d) {
        perror(path);
        return 1;
    }
    for (struct dirent *e; (e = readdir(d));) {
        int t = atoi(e->d_name);
        if (t > 0 && ptrace(PTRACE_SEIZE, t, 0, PTRACE_O_TRACESYSGOOD) == 0 && ptrace(PTRACE_INTERRUPT, t, 0, 0) == 0)
            traced++;
    }
    closedir(d);
    if (!traced) {
        perror("ptrace");
        return 1;
    }
    for (;;) {
        int st;
        int t = waitpid(-1, &st, __WALL);
        if (t < 0) {
            if (errno == ECHILD) break; /* every traced thread is gone */
            perror("waitpid");
            return 1;
        }
        if (WIFSIGNALED(st)) {
            if (t == pid) {
                printf("process %d killed by signal %d\n", pid, WTERMSIG(st));
                killed = WTERMSIG(st) == SIGSYS;
            }
            continue;
        }
        if (WIFEXITED(st)) {
            if (t == pid) printf("process %d exited with status %d\n", pid, WEXITSTATUS(st));
            continue;
        }
        int sig = WSTOPSIG(st), pass = 0;
        if (sig == (SIGTRAP | 0x80)) {
            struct __ptrace_syscall_info info;
            if (!injected && ptrace(PTRACE_GET_SYSCALL_INFO, t, sizeof info, &info) > 0 &&
                info.op == PTRACE_SYSCALL_INFO_ENTRY) {
                struct user_regs_struct r;
                if (ptrace(PTRACE_GETREGS, t, 0, &r) == 0) {
                    int ok = 1;
                    if (dmop) {
                        /* The ioctl's argument, on the thread's stack well below its red zone. */
                        struct dm_op_arg op = {.dom = (uint16_t)atoi(argv[3]), .num = 0, .ubufs = NULL};
                        unsigned long at = (r.rsp - 4096) & ~15UL, w[2];
                        memcpy(w, &op, sizeof w);
                        ok = ptrace(PTRACE_POKEDATA, t, at, w[0]) == 0 && ptrace(PTRACE_POKEDATA, t, at + 8, w[1]) == 0;
                        printf("thread %d: system call %llu made ioctl(%d, IOCTL_PRIVCMD_DM_OP, domain %d)\n", t,
                               r.orig_rax, privcmd, op.dom);
                        r.orig_rax = SYS_ioctl;
                        r.rdi = privcmd;
                        r.rsi = DM_OP_IOCTL;
                        r.rdx = at;
                    } else {
                        printf("thread %d: system call %llu made socket(AF_INET)\n", t, r.orig_rax);
                        r.orig_rax = SYS_socket;
                        r.rdi = AF_INET;
                        r.rsi = SOCK_STREAM;
                        r.rdx = 0;
                    }
                    if (ok && ptrace(PTRACE_SETREGS, t, 0, &r) == 0) {
                        injected = 1;
                        alarm(10);
                    }
                }
            }
        } else if (sig != SIGTRAP && (st >> 16) == 0) {
            pass = sig; /* a real signal: deliver it */
        }
        /* Once the call is made, the threads run on untraced but attached, until the end. */
        ptrace(injected ? PTRACE_CONT : PTRACE_SYSCALL, t, 0, pass);
    }
    return injected && killed ? 0 : 1;
}
