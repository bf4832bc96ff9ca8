// Guest side of tests/guest/ivshmem.sh: drives QEMU's ivshmem-doorbell device
// through VFIO (the guest has a virtual IOMMU), so that its MSI-X vector has
// a handler: the interrupt the Ringfence backend raises arrives on an eventfd
// and shows in /proc/interrupts. Speaks virtio-msg by hand: a PING in slot 0
// of the driver -> device queue, a doorbell to peer 0, the PONG read back.
// Usage: ivshmem-guest <iommu group> <pci address>. Prints RF: lines.
#include <fcntl.h>
#include <linux/vfio.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

static int dev;
static uint64_t bar0;

static void fail(const char *what) {
    printf("RF: FAIL %s\n", what);
    exit(1);
}

static void doorbell(uint32_t v) {
    if (pwrite(dev, &v, 4, bar0 + 12) != 4) fail("doorbell write");
}

int main(int argc, char **argv) {
    if (argc != 3) fail("usage");
    char path[64];
    int container = open("/dev/vfio/vfio", O_RDWR);
    snprintf(path, sizeof path, "/dev/vfio/%s", argv[1]);
    int group = open(path, O_RDWR);
    if (container < 0 || group < 0) fail("open vfio");
    struct vfio_group_status st = {.argsz = sizeof st};
    ioctl(group, VFIO_GROUP_GET_STATUS, &st);
    if (!(st.flags & VFIO_GROUP_FLAGS_VIABLE)) fail("group not viable");
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container)) fail("set container");
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU)) fail("set iommu");
    dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, argv[2]);
    if (dev < 0) fail("device fd");

    struct vfio_region_info r0 = {.argsz = sizeof r0, .index = VFIO_PCI_BAR0_REGION_INDEX};
    struct vfio_region_info r2 = {.argsz = sizeof r2, .index = VFIO_PCI_BAR2_REGION_INDEX};
    if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &r0) || ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &r2))
        fail("region info");
    bar0 = r0.offset;
    volatile uint8_t *shm = mmap(NULL, r2.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev, r2.offset);
    if (shm == MAP_FAILED) fail("mmap BAR2");
    printf("RF: bar2 %llu bytes\n", (unsigned long long)r2.size);

    // 1. What the backend initialised.
    char magic[17] = {0};
    for (int i = 0; i < 16; i++) magic[i] = shm[8192 + i];
    if (strcmp(magic, "ringfence ivshm1") == 0) printf("RF: PASS magic\n");
    else printf("RF: FAIL magic '%s'\n", magic);

    // 2. MSI-X vector 0 -> an eventfd. An MSI is a write by the device:
    //    bus mastering must be on (a VFIO user's job).
    struct vfio_region_info cfg = {.argsz = sizeof cfg, .index = VFIO_PCI_CONFIG_REGION_INDEX};
    uint16_t cmd;
    if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &cfg) || pread(dev, &cmd, 2, cfg.offset + 4) != 2)
        fail("config space");
    cmd |= 0x4;
    if (pwrite(dev, &cmd, 2, cfg.offset + 4) != 2) fail("bus master");
    int efd = eventfd(0, 0);
    char buf[sizeof(struct vfio_irq_set) + sizeof(int)];
    struct vfio_irq_set *set = (struct vfio_irq_set *)buf;
    set->argsz = sizeof buf;
    set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    set->index = VFIO_PCI_MSIX_IRQ_INDEX;
    set->start = 0;
    set->count = 1;
    memcpy(set->data, &efd, sizeof efd);
    if (ioctl(dev, VFIO_DEVICE_SET_IRQS, set)) fail("MSI-X set-up");

    // 3. PING (bus 0x03, token 7, msg_size 12, data 0xC0FFEE) in slot 0 of
    //    page 0; head = 1; ring peer 0, vector 0.
    volatile uint32_t *q0 = (volatile uint32_t *)shm;
    volatile uint32_t *q1 = (volatile uint32_t *)(shm + 4096);
    q0[128 / 4] = 0x00000302;
    q0[132 / 4] = 0x000C0007;
    q0[136 / 4] = 0x00C0FFEE;
    __atomic_store_n(&q0[0], 1, __ATOMIC_RELEASE);
    doorbell(0 << 16 | 0);

    struct pollfd p = {.fd = efd, .events = POLLIN};
    if (poll(&p, 1, 10000) == 1) {
        uint64_t n;
        read(efd, &n, sizeof n);
        printf("RF: PASS interrupt (%llu)\n", (unsigned long long)n);
    } else {
        printf("RF: FAIL interrupt: none in 10 s\n");
    }
    for (int i = 0; i < 100 && __atomic_load_n(&q1[0], __ATOMIC_ACQUIRE) == 0; i++) usleep(100000);
    uint32_t w0 = q1[128 / 4], w1 = q1[132 / 4], w2 = q1[136 / 4];
    if (w0 == 0x00000303 && w1 == 0x000C0007 && w2 == 0x00C0FFEE) printf("RF: PASS pong\n");
    else printf("RF: FAIL pong %08x %08x %08x\n", w0, w1, w2);
    FILE *f = fopen("/proc/interrupts", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
        if (strstr(line, "vfio")) printf("RF: %s", line);
    if (f) fclose(f);
    printf("RF: queue indices: to-device head %u tail %u, to-driver head %u tail %u\n",
           q0[0], q0[16], q1[0], q1[16]);
    // Consumed: the device may send again.
    __atomic_store_n(&q1[16], 1, __ATOMIC_RELEASE);
    return 0;
}
