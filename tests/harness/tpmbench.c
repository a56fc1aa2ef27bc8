/* Times TPM2_GetRandom(16) through a TPM character device, many iterations in one process,
 * and prints the median and 99th percentile in microseconds. Runs inside test guests. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: tpmbench DEVICE ITERATIONS\n"); return 2; }
    int n = atoi(argv[2]);
    int fd = open(argv[1], O_RDWR);
    if (fd < 0 || n <= 0) { perror(argv[1]); return 1; }
    const unsigned char cmd[] = {0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 0x10};
    unsigned char rsp[4096];
    double *t = malloc(sizeof(double) * n);
    for (int i = 0; i < n; i++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        if (write(fd, cmd, sizeof cmd) != (ssize_t)sizeof cmd) { perror("write"); return 1; }
        ssize_t r = read(fd, rsp, sizeof rsp);
        clock_gettime(CLOCK_MONOTONIC, &b);
        if (r < 10 || rsp[6] | rsp[7] | rsp[8] | rsp[9]) { fprintf(stderr, "bad response\n"); return 1; }
        t[i] = (b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3;
    }
    qsort(t, n, sizeof(double), cmp);
    printf("median_us %.1f p99_us %.1f n %d\n", t[n / 2], t[(n * 99) / 100], n);
    return 0;
}
