/*
 * udp_flood: sends UDP datagrams as fast as the kernel takes them, for `tools/bench io`'s
 * receive cases, where the guest counts what its VMM delivers from a tap.
 *
 *     udp_flood SOURCE_ADDRESS DESTINATION_ADDRESS PORT PAYLOAD_BYTES
 *
 * It binds SOURCE_ADDRESS (any port), connects to DESTINATION_ADDRESS:PORT and sends the same
 * PAYLOAD_BYTES-byte datagram over and over, 64 to a sendmmsg(2) call, until SIGTERM or
 * SIGINT; then it prints one line on stdout:
 *
 *     sent=<datagrams> refused=<sends the kernel refused> seconds=<elapsed, to the microsecond>
 *
 * Python cannot offer load fast enough for this (one system call per datagram), hence C.
 * Refusals (ENOBUFS, EAGAIN, ECONNREFUSED) are counted and retried: they only mean the path
 * to the tap is full, which is the point of a flood.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_PAYLOAD 65507

static volatile sig_atomic_t stopping;

static void stop(int signal_number)
{
    (void)signal_number;
    stopping = 1;
}

static double monotonic_seconds(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

static int parse_address(const char *text, unsigned short port, struct sockaddr_in *address)
{
    memset(address, 0, sizeof(*address));
    address->sin_family = AF_INET;
    address->sin_port = htons(port);
    return inet_pton(AF_INET, text, &address->sin_addr) == 1 ? 0 : -1;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s SOURCE_ADDRESS DESTINATION_ADDRESS PORT PAYLOAD_BYTES\n",
                argv[0]);
        return 2;
    }
    long port = strtol(argv[3], NULL, 10);
    long payload_bytes = strtol(argv[4], NULL, 10);
    struct sockaddr_in source, destination;
    if (port <= 0 || port > 65535 || payload_bytes < 0 || payload_bytes > MAX_PAYLOAD ||
        parse_address(argv[1], 0, &source) != 0 ||
        parse_address(argv[2], (unsigned short)port, &destination) != 0) {
        fprintf(stderr, "udp_flood: bad arguments (addresses are dotted IPv4, the payload at "
                        "most %d bytes)\n", MAX_PAYLOAD);
        return 2;
    }

    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = stop;
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGINT, &action, NULL);

    int socket_fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (socket_fd < 0) {
        perror("udp_flood: socket");
        return 1;
    }
    if (bind(socket_fd, (struct sockaddr *)&source, sizeof(source)) != 0) {
        perror("udp_flood: bind");
        return 1;
    }
    if (connect(socket_fd, (struct sockaddr *)&destination, sizeof(destination)) != 0) {
        perror("udp_flood: connect");
        return 1;
    }

    static char payload[MAX_PAYLOAD];
    for (long offset = 0; offset < payload_bytes; offset++)
        payload[offset] = (char)offset;
    struct iovec vector = {.iov_base = payload, .iov_len = (size_t)payload_bytes};
    struct mmsghdr messages[BATCH];
    memset(messages, 0, sizeof(messages));
    for (int index = 0; index < BATCH; index++) {
        messages[index].msg_hdr.msg_iov = &vector;
        messages[index].msg_hdr.msg_iovlen = 1;
    }

    unsigned long long sent = 0, refused = 0;
    double start = monotonic_seconds();
    while (!stopping) {
        int count = sendmmsg(socket_fd, messages, BATCH, 0);
        if (count > 0) {
            sent += (unsigned long long)count;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == ENOBUFS || errno == EAGAIN || errno == ECONNREFUSED) {
            refused++;
            continue;
        }
        perror("udp_flood: sendmmsg");
        return 1;
    }
    printf("sent=%llu refused=%llu seconds=%.6f\n", sent, refused, monotonic_seconds() - start);
    return 0;
}
