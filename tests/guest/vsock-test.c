/* A tiny static vsock client/listener for the guest test (busybox has none).
 *   vsock-test connect CID PORT   send "hello from guest\n", print the reply line
 *   vsock-test listen PORT        accept one connection, echo one line back as "echo:<line>"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

static int read_line(int fd, char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(fd, buf + n, 1);
        if (r <= 0) break;
        if (buf[n++] == '\n') break;
    }
    buf[n] = 0;
    return (int)n;
}

int main(int argc, char **argv) {
    char line[256];
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    struct sockaddr_vm addr = { .svm_family = AF_VSOCK };
    if (argc == 4 && !strcmp(argv[1], "connect")) {
        addr.svm_cid = atoi(argv[2]);
        addr.svm_port = atoi(argv[3]);
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr)) { perror("connect"); return 1; }
        const char *msg = "hello from guest\n";
        if (write(fd, msg, strlen(msg)) < 0) { perror("write"); return 1; }
        if (read_line(fd, line, sizeof line) <= 0) { fprintf(stderr, "no reply\n"); return 1; }
        printf("%s", line);
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        addr.svm_cid = VMADDR_CID_ANY;
        addr.svm_port = atoi(argv[2]);
        if (bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, 1)) { perror("bind"); return 1; }
        printf("listening\n");
        fflush(stdout);
        int c = accept(fd, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        if (read_line(c, line, sizeof line) <= 0) { fprintf(stderr, "no line\n"); return 1; }
        char out[300];
        int n = snprintf(out, sizeof out, "echo:%s", line);
        if (write(c, out, n) < 0) { perror("write"); return 1; }
        close(c);
        return 0;
    }
    fprintf(stderr, "usage: vsock-test connect CID PORT | listen PORT\n");
    return 2;
}
