/*
 * spawn_measured: runs one command and reports how it ended, for tools/bench.
 *
 *     spawn_measured REPORT_FD COMMAND [ARGUMENT...]
 *
 * Why this exists rather than Python's own fork/exec and os.wait4: Linux carries a process's
 * peak RSS across execve (the kernel folds the old address space's high-water mark into
 * ru_maxrss at exec), so a VMM spawned straight from the ~15 MiB Python interpreter reports
 * at least the interpreter's RSS. Forked from this small static program instead, the VMM's
 * ru_maxrss is its own (plus this program's few hundred KiB at most).
 *
 * It forks, execs COMMAND with the same stdin, stdout and stderr, waits for it with wait4
 * and writes one line to REPORT_FD:
 *
 *     <spawn ns> <exit ns> <exit status> <ru_maxrss KiB>
 *
 * where the times are CLOCK_MONOTONIC (Python's time.monotonic()) just before fork and just
 * after wait4 returns, and the exit status is as Python's os.waitstatus_to_exitcode: the
 * code, or minus the signal number. SIGTERM and SIGINT are ignored here once the command
 * runs, so that the benchmark can signal the whole process group to stop the command and
 * still get the report.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s REPORT_FD COMMAND [ARGUMENT...]\n", argv[0]);
        return 2;
    }
    int report_fd = atoi(argv[1]);
    /* The command must not inherit the report pipe, or its end would stay open. */
    if (fcntl(report_fd, F_SETFD, FD_CLOEXEC) != 0) {
        fprintf(stderr, "spawn_measured: report fd %d: %s\n", report_fd, strerror(errno));
        return 2;
    }

    /* Held back until the parent ignores them, so that none is lost or kills it early. */
    sigset_t stop_signals, previous;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    sigprocmask(SIG_BLOCK, &stop_signals, &previous);

    long long spawn_ns = monotonic_ns();
    pid_t child = fork();
    if (child < 0) {
        fprintf(stderr, "spawn_measured: fork: %s\n", strerror(errno));
        return 2;
    }
    if (child == 0) {
        sigprocmask(SIG_SETMASK, &previous, NULL);
        execvp(argv[2], &argv[2]);
        fprintf(stderr, "spawn_measured: cannot run %s: %s\n", argv[2], strerror(errno));
        _exit(127);
    }
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    sigprocmask(SIG_SETMASK, &previous, NULL);

    int status;
    struct rusage usage;
    while (wait4(child, &status, 0, &usage) < 0) {
        if (errno != EINTR) {
            fprintf(stderr, "spawn_measured: wait4: %s\n", strerror(errno));
            return 2;
        }
    }
    long long exit_ns = monotonic_ns();
    int exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);

    char report[128];
    int length = snprintf(report, sizeof report, "%lld %lld %d %ld\n", spawn_ns, exit_ns,
                          exit_status, usage.ru_maxrss);
    if (write(report_fd, report, (size_t)length) != length) {
        fprintf(stderr, "spawn_measured: cannot write the report: %s\n", strerror(errno));
        return 2;
    }
    return 0;
}
