#!/bin/sh
# In-guest fio jobs for the backend comparison; prints "RF: fio <job> iops=<n> bw_kib=<n>".
RT=${RF_FIO_RUNTIME:-8}
run() {
    name=$1 rw=$2 bs=$3 qd=$4
    out=$(fio --name="$name" --filename=/dev/vda --direct=1 --ioengine=io_uring --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --size=512M --runtime="$RT" --time_based --ramp_time=1 \
        --output-format=terse --terse-version=3 2>/dev/null)
    case $rw in
        *write) iops=$(echo "$out" | cut -d';' -f49); bw=$(echo "$out" | cut -d';' -f48) ;;
        *) iops=$(echo "$out" | cut -d';' -f8); bw=$(echo "$out" | cut -d';' -f7) ;;
    esac
    echo "RF: fio $name iops=$iops bw_kib=$bw"
}
# Lay data down once so reads hit allocated blocks.
dd if=/dev/zero of=/dev/vda bs=1M count=512 oflag=direct 2>/dev/null
run randread-4k-qd1 randread 4k 1
run randread-4k-qd32 randread 4k 32
run randwrite-4k-qd32 randwrite 4k 32
run seqread-128k-qd8 read 128k 8
