//! virtio-blk driven through its MMIO registers and a split queue in guest memory, over a real
//! image file: every request type checked against the file's bytes, read-only refusals, hostile
//! chains, queue wrap-around and reset mid-flight.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use tempfile::NamedTempFile;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::*;
use crate::bus::{lock, BusDevice};
use crate::virtio::test_driver::{
    offset, Buffer, RawDescriptor, TestDriver, DATA_START, MEMORY_SIZE,
};
use crate::virtio::COMMON_FEATURES;

const SECTORS: u64 = 64;
const HEADER: u64 = DATA_START;
const STATUS: u64 = DATA_START + 0x100;
const DATA: u64 = DATA_START + 0x1000;
const ALL_FEATURES: u64 = COMMON_FEATURES
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_BLK_SIZE)
    | (1 << VIRTIO_BLK_F_DISCARD)
    | (1 << VIRTIO_BLK_F_WRITE_ZEROES);

/// A disk of `SECTORS` sectors where every byte of sector `n` is `n`.
fn patterned_image() -> NamedTempFile {
    let mut image = NamedTempFile::new().unwrap();
    for sector in 0..SECTORS {
        image.write_all(&[sector as u8; 512]).unwrap();
    }
    image.flush().unwrap();
    image
}

fn sector_of(image: &NamedTempFile, sector: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; 512];
    image
        .as_file()
        .read_exact_at(&mut bytes, sector * 512)
        .unwrap();
    bytes
}

struct Disk {
    driver: TestDriver,
    block: Arc<Mutex<Block>>,
    image: NamedTempFile,
}

fn disk(read_only: bool, features: u64) -> Disk {
    disk_opened(read_only, false, true, features)
}

/// A hook for worker threads that has nothing to prepare (the VMM installs a seccomp filter).
fn no_preparation() -> ThreadStartHook {
    Arc::new(|| Ok(()))
}

/// A disk over a fresh patterned image; `workers` starts its I/O threads, as the VMM does.
fn disk_opened(read_only: bool, direct: bool, workers: bool, features: u64) -> Disk {
    let image = patterned_image();
    let mut block = Block::new(&BlockConfig {
        path: image.path().to_path_buf(),
        read_only,
        id: "cove-disk-0".into(),
        direct,
    })
    .unwrap();
    if workers {
        block.start_workers(no_preparation()).unwrap();
    }
    let block = Arc::new(Mutex::new(block));
    let mut driver = TestDriver::new(block.clone());
    let offered = driver.device_features();
    driver.initialise(features & offered, 16);
    Disk {
        driver,
        block,
        image,
    }
}

impl Disk {
    /// Queues a request: header, `data` buffers, a status byte; returns the chain's head.
    fn push(&mut self, request_type: u32, sector: u64, data: &[Buffer]) -> u16 {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.driver.write_bytes(HEADER, &header);
        self.driver.write_bytes(STATUS, &[0xff]);
        let mut chain = vec![Buffer::readable(HEADER, 16)];
        chain.extend_from_slice(data);
        chain.push(Buffer::writable(STATUS, 1));
        self.driver.push_chain(0, &chain)
    }

    /// Sends one request and returns (status byte, used length).
    fn request(&mut self, request_type: u32, sector: u64, data: &[Buffer]) -> (u8, u32) {
        let head = self.push(request_type, sector, data);
        self.driver.kick(0);
        let used = self.driver.wait_used(0, 1);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        (self.driver.read_bytes(STATUS, 1)[0], used[0].1)
    }

    fn zero_range(&mut self, request_type: u32, sector: u64, sectors: u32, flags: u32) -> u8 {
        let mut range = [0u8; 16];
        range[0..8].copy_from_slice(&sector.to_le_bytes());
        range[8..12].copy_from_slice(&sectors.to_le_bytes());
        range[12..16].copy_from_slice(&flags.to_le_bytes());
        self.driver.write_bytes(DATA, &range);
        self.request(request_type, 0, &[Buffer::readable(DATA, 16)])
            .0
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn configuration_space_reports_capacity_and_limits() {
    let mut disk = disk(false, ALL_FEATURES);
    let features = disk.driver.device_features();
    assert_eq!(features & ALL_FEATURES, ALL_FEATURES);
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    let mut capacity = [0u8; 8];
    disk.driver.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), SECTORS);
    let mut low = [0u8; 4];
    disk.driver.read_config(0, &mut low);
    assert_eq!(u32::from_le_bytes(low), SECTORS as u32);
    let mut field = [0u8; 4];
    disk.driver.read_config(12, &mut field);
    assert_eq!(u32::from_le_bytes(field), 254, "seg_max");
    disk.driver.read_config(20, &mut field);
    assert_eq!(u32::from_le_bytes(field), 512, "blk_size");
    disk.driver.read_config(52, &mut field);
    assert_eq!(u32::from_le_bytes(field), 1, "max_write_zeroes_seg");
    // Past the end of the configuration space reads zero; writes change nothing.
    disk.driver.read_config(0x400, &mut field);
    assert_eq!(field, [0; 4]);
    disk.driver
        .transport
        .write(u64::from(offset::CONFIG), &[9; 4]);
    disk.driver.read_config(0, &mut low);
    assert_eq!(u32::from_le_bytes(low), SECTORS as u32);
}

#[test]
fn the_driver_reads_sectors_the_host_wrote() {
    let mut disk = disk(false, ALL_FEATURES);
    let (status, used) = disk.request(VIRTIO_BLK_T_IN, 3, &[Buffer::writable(DATA, 512)]);
    assert_eq!((status, used), (OK, 513));
    assert_eq!(disk.driver.read_bytes(DATA, 512), vec![3; 512]);

    // Two sectors into two unevenly split buffers.
    let (status, used) = disk.request(
        VIRTIO_BLK_T_IN,
        10,
        &[
            Buffer::writable(DATA + 0x2000, 100),
            Buffer::writable(DATA + 0x3000, 924),
        ],
    );
    assert_eq!((status, used), (OK, 1025));
    let mut expected = vec![10u8; 512];
    expected.extend_from_slice(&[11; 512]);
    let mut got = disk.driver.read_bytes(DATA + 0x2000, 100);
    got.extend(disk.driver.read_bytes(DATA + 0x3000, 924));
    assert_eq!(got, expected);

    // The last sector is readable, one past it is not.
    assert_eq!(
        disk.request(VIRTIO_BLK_T_IN, SECTORS - 1, &[Buffer::writable(DATA, 512)]),
        (OK, 513)
    );
    assert_eq!(
        disk.request(VIRTIO_BLK_T_IN, SECTORS, &[Buffer::writable(DATA, 512)]),
        (IOERR, 1)
    );
}

#[test]
fn sectors_the_driver_writes_are_found_in_the_image() {
    let mut disk = disk(false, ALL_FEATURES);
    disk.driver.write_bytes(DATA, &[0xa5; 300]);
    disk.driver.write_bytes(DATA + 0x1000, &[0x5a; 724]);
    let (status, used) = disk.request(
        VIRTIO_BLK_T_OUT,
        5,
        &[
            Buffer::readable(DATA, 300),
            Buffer::readable(DATA + 0x1000, 724),
        ],
    );
    assert_eq!((status, used), (OK, 1));
    let mut expected = vec![0xa5u8; 300];
    expected.extend_from_slice(&[0x5a; 212]);
    assert_eq!(sector_of(&disk.image, 5), expected);
    assert_eq!(sector_of(&disk.image, 6), vec![0x5a; 512]);
    assert_eq!(sector_of(&disk.image, 4), vec![4; 512]);
    assert_eq!(sector_of(&disk.image, 7), vec![7; 512]);

    assert_eq!(disk.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    // Half a sector is not a write.
    assert_eq!(
        disk.request(VIRTIO_BLK_T_OUT, 8, &[Buffer::readable(DATA, 256)]),
        (IOERR, 1)
    );
    assert_eq!(sector_of(&disk.image, 8), vec![8; 512]);
    assert!(lock(&disk.block).is_activated());
    assert_eq!(lock(&disk.block).counters().failed_requests, 1);
}

#[test]
fn a_direct_disk_moves_unaligned_guest_buffers_through_its_bounce_buffer() {
    let mut disk = disk_opened(false, true, true, ALL_FEATURES);
    let (status, used) = disk.request(
        VIRTIO_BLK_T_IN,
        10,
        &[
            Buffer::writable(DATA + 0x2003, 100),
            Buffer::writable(DATA + 0x3001, 924),
        ],
    );
    assert_eq!((status, used), (OK, 1025));
    let mut got = disk.driver.read_bytes(DATA + 0x2003, 100);
    got.extend(disk.driver.read_bytes(DATA + 0x3001, 924));
    let mut expected = vec![10u8; 512];
    expected.extend_from_slice(&[11; 512]);
    assert_eq!(got, expected);

    disk.driver.write_bytes(DATA + 0x11, &[0xa5; 300]);
    disk.driver.write_bytes(DATA + 0x1005, &[0x5a; 724]);
    let (status, _) = disk.request(
        VIRTIO_BLK_T_OUT,
        5,
        &[
            Buffer::readable(DATA + 0x11, 300),
            Buffer::readable(DATA + 0x1005, 724),
        ],
    );
    assert_eq!(status, OK);
    let mut expected = vec![0xa5u8; 300];
    expected.extend_from_slice(&[0x5a; 212]);
    assert_eq!(sector_of(&disk.image, 5), expected);
    assert_eq!(sector_of(&disk.image, 6), vec![0x5a; 512]);
    assert_eq!(sector_of(&disk.image, 7), vec![7; 512]);
    assert_eq!(disk.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    assert_eq!(lock(&disk.block).counters().bounced_requests, 2);
}

#[test]
fn a_direct_disk_moves_aligned_guest_buffers_without_bouncing() {
    let mut disk = disk_opened(false, true, true, ALL_FEATURES);
    let (status, used) = disk.request(
        VIRTIO_BLK_T_IN,
        10,
        &[
            Buffer::writable(DATA + 0x2000, 512),
            Buffer::writable(DATA + 0x3200, 1024),
        ],
    );
    assert_eq!((status, used), (OK, 1537));
    assert_eq!(disk.driver.read_bytes(DATA + 0x2000, 512), vec![10; 512]);
    let mut expected = vec![11u8; 512];
    expected.extend_from_slice(&[12; 512]);
    assert_eq!(disk.driver.read_bytes(DATA + 0x3200, 1024), expected);

    disk.driver.write_bytes(DATA, &[0x3c; 4096]);
    assert_eq!(
        disk.request(VIRTIO_BLK_T_OUT, 20, &[Buffer::readable(DATA, 4096)]),
        (OK, 1)
    );
    for sector in 20..28 {
        assert_eq!(sector_of(&disk.image, sector), vec![0x3c; 512]);
    }
    assert_eq!(sector_of(&disk.image, 28), vec![28; 512]);
    assert_eq!(lock(&disk.block).counters().bounced_requests, 0);
}

/// Queues one single-sector write per sector of the disk, each with its own header, data and
/// status byte, all in flight at once on a 256-entry queue.
fn write_every_sector(disk: &mut Disk, fill: impl Fn(u64) -> u8) -> Vec<u32> {
    let mut heads = Vec::new();
    for sector in 0..SECTORS {
        let header_address = DATA + 0x4_0000 + sector * 16;
        let buffer = DATA + sector * 512;
        let status = STATUS + 1 + sector;
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        disk.driver.write_bytes(header_address, &header);
        disk.driver.write_bytes(buffer, &[fill(sector); 512]);
        disk.driver.write_bytes(status, &[0xff]);
        heads.push(u32::from(disk.driver.push_chain(
            0,
            &[
                Buffer::readable(header_address, 16),
                Buffer::readable(buffer, 512),
                Buffer::writable(status, 1),
            ],
        )));
    }
    disk.driver.kick(0);
    heads
}

#[test]
fn many_requests_in_flight_all_land_and_a_flush_follows_them() {
    let mut disk = disk(false, ALL_FEATURES);
    disk.driver.initialise(ALL_FEATURES, 256);
    let mut heads = write_every_sector(&mut disk, |sector| 0x80 | sector as u8);
    let mut used = disk.driver.wait_used(0, SECTORS as usize);
    used.sort_unstable();
    heads.sort_unstable();
    assert_eq!(
        used,
        heads.iter().map(|&head| (head, 1)).collect::<Vec<_>>()
    );
    assert_eq!(
        disk.driver.read_bytes(STATUS + 1, SECTORS as usize),
        vec![OK; SECTORS as usize]
    );
    for sector in 0..SECTORS {
        assert_eq!(
            sector_of(&disk.image, sector),
            vec![0x80 | sector as u8; 512]
        );
    }
    assert_eq!(disk.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    let counters = lock(&disk.block).counters();
    assert_eq!((counters.requests, counters.failed_requests), (65, 0));
}

#[test]
fn a_reset_with_requests_in_flight_waits_for_them_and_the_device_starts_over() {
    let mut disk = disk(false, ALL_FEATURES);
    disk.driver.initialise(ALL_FEATURES, 256);
    write_every_sector(&mut disk, |_| 0xee);
    // The driver resets while the workers have the writes.
    disk.driver.write(offset::STATUS, 0);
    assert_eq!(disk.driver.status(), 0);
    assert!(!lock(&disk.block).is_activated());
    // Nothing comes back for the old queue, and the completion event is quiet.
    lock(&disk.block).process_backend().unwrap();
    assert_eq!(disk.driver.take_used(0), vec![]);
    let fd = lock(&disk.block).backend_fd().unwrap();
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the length given; poll only writes `revents`.
    assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 0);

    disk.driver.initialise(ALL_FEATURES, 256);
    write_every_sector(&mut disk, |sector| sector as u8 ^ 0x55);
    assert_eq!(
        disk.driver.wait_used(0, SECTORS as usize).len(),
        SECTORS as usize
    );
    for sector in 0..SECTORS {
        assert_eq!(
            sector_of(&disk.image, sector),
            vec![sector as u8 ^ 0x55; 512]
        );
    }
}

#[test]
fn without_workers_requests_run_inside_process_queue() {
    let mut disk = disk_opened(false, false, false, ALL_FEATURES);
    disk.driver.write_bytes(DATA, &[0x42; 512]);
    let head = disk.push(VIRTIO_BLK_T_OUT, 3, &[Buffer::readable(DATA, 512)]);
    disk.driver.kick(0);
    assert_eq!(disk.driver.take_used(0), vec![(u32::from(head), 1)]);
    assert_eq!(sector_of(&disk.image, 3), vec![0x42; 512]);
    let head = disk.push(VIRTIO_BLK_T_IN, 4, &[Buffer::writable(DATA, 512)]);
    disk.driver.kick(0);
    assert_eq!(disk.driver.take_used(0), vec![(u32::from(head), 513)]);
    assert_eq!(disk.driver.read_bytes(DATA, 512), vec![4; 512]);
}

#[test]
fn get_id_returns_the_configured_id() {
    let mut disk = disk(false, ALL_FEATURES);
    let (status, used) = disk.request(VIRTIO_BLK_T_GET_ID, 0, &[Buffer::writable(DATA, 20)]);
    assert_eq!((status, used), (OK, 21));
    let mut expected = b"cove-disk-0".to_vec();
    expected.resize(20, 0);
    assert_eq!(disk.driver.read_bytes(DATA, 20), expected);
}

#[test]
fn discard_and_write_zeroes_zero_the_range() {
    let mut disk = disk(false, ALL_FEATURES);
    assert_eq!(disk.zero_range(VIRTIO_BLK_T_DISCARD, 2, 2, 0), OK);
    assert_eq!(disk.zero_range(VIRTIO_BLK_T_WRITE_ZEROES, 10, 3, 0), OK);
    assert_eq!(
        disk.zero_range(
            VIRTIO_BLK_T_WRITE_ZEROES,
            20,
            1,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        ),
        OK
    );
    for sector in 0..SECTORS {
        let zeroed = matches!(sector, 2 | 3 | 10..=12 | 20);
        let expected = if zeroed { 0 } else { sector as u8 };
        assert_eq!(
            sector_of(&disk.image, sector),
            vec![expected; 512],
            "sector {sector}"
        );
    }
    // Discard takes no flags; ranges must fit the disk.
    assert_eq!(
        disk.zero_range(
            VIRTIO_BLK_T_DISCARD,
            0,
            1,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        ),
        UNSUPP
    );
    assert_eq!(
        disk.zero_range(VIRTIO_BLK_T_WRITE_ZEROES, SECTORS - 1, 2, 0),
        IOERR
    );
    assert_eq!(
        sector_of(&disk.image, SECTORS - 1),
        vec![(SECTORS - 1) as u8; 512]
    );
}

#[test]
fn discard_and_write_zeroes_need_their_features() {
    let mut disk = disk(false, ALL_FEATURES & !(1 << VIRTIO_BLK_F_DISCARD));
    assert_eq!(disk.zero_range(VIRTIO_BLK_T_DISCARD, 2, 1, 0), UNSUPP);
    assert_eq!(sector_of(&disk.image, 2), vec![2; 512]);
    assert_eq!(disk.zero_range(VIRTIO_BLK_T_WRITE_ZEROES, 2, 1, 0), OK);
}

#[test]
fn a_read_only_disk_refuses_writes_and_still_reads() {
    let mut disk = disk(true, ALL_FEATURES | (1 << VIRTIO_BLK_F_RO));
    let features = disk.driver.device_features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);

    disk.driver.write_bytes(DATA, &[0xee; 512]);
    assert_eq!(
        disk.request(VIRTIO_BLK_T_OUT, 1, &[Buffer::readable(DATA, 512)]),
        (IOERR, 1)
    );
    assert_eq!(disk.zero_range(VIRTIO_BLK_T_DISCARD, 1, 1, 0), UNSUPP);
    assert_eq!(disk.zero_range(VIRTIO_BLK_T_WRITE_ZEROES, 1, 1, 0), UNSUPP);
    assert_eq!(sector_of(&disk.image, 1), vec![1; 512]);
    assert_eq!(
        disk.request(VIRTIO_BLK_T_IN, 1, &[Buffer::writable(DATA, 512)]),
        (OK, 513)
    );
    assert_eq!(disk.driver.read_bytes(DATA, 512), vec![1; 512]);
    assert_eq!(disk.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    assert_eq!(
        disk.request(VIRTIO_BLK_T_GET_ID, 0, &[Buffer::writable(DATA, 20)])
            .0,
        OK
    );
}

#[test]
fn unknown_requests_are_unsupported() {
    let mut disk = disk(false, ALL_FEATURES);
    assert_eq!(disk.request(2, 0, &[]), (UNSUPP, 1));
    assert_eq!(
        disk.request(0xdead, 0, &[Buffer::writable(DATA, 512)]),
        (UNSUPP, 1)
    );
}

#[test]
fn hostile_chains_fail_alone_and_never_touch_memory_outside_the_guest() {
    let mut disk = disk(false, ALL_FEATURES);
    let end = MEMORY_SIZE;

    // Data outside guest memory: IOERR in the status byte, nothing written anywhere.
    assert_eq!(
        disk.request(VIRTIO_BLK_T_IN, 0, &[Buffer::writable(end - 256, 512)]),
        (IOERR, 1)
    );
    assert_eq!(
        disk.request(
            VIRTIO_BLK_T_OUT,
            0,
            &[Buffer::readable(u64::MAX - 100, 512)]
        ),
        (IOERR, 1)
    );
    assert_eq!(sector_of(&disk.image, 0), vec![0; 512]);
    // A read whose data buffer is device-readable is missing its data: nothing to read into.
    assert_eq!(
        disk.request(VIRTIO_BLK_T_IN, 1, &[Buffer::readable(DATA, 512)]),
        (OK, 1)
    );

    // The status byte outside guest memory, or not writable: the chain comes back with 0.
    let header = |disk: &mut Disk, request_type: u32| {
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&request_type.to_le_bytes());
        disk.driver.write_bytes(HEADER, &bytes);
    };
    header(&mut disk, VIRTIO_BLK_T_IN);
    let mut chains: Vec<Vec<RawDescriptor>> = Vec::new();
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let raw = |address: u64, len: u32, flags: u16, next: u16| RawDescriptor {
        address,
        len,
        flags,
        next,
    };
    // Status past the end of memory.
    chains.push(vec![raw(HEADER, 16, next, 1), raw(end, 1, write, 0)]);
    // Status not device-writable.
    chains.push(vec![raw(HEADER, 16, next, 1), raw(STATUS, 1, 0, 0)]);
    // A link to a descriptor beyond the queue.
    chains.push(vec![raw(HEADER, 16, next, 999)]);
    // A loop: 0 -> 1 -> 0.
    chains.push(vec![
        raw(HEADER, 16, next, 1),
        raw(STATUS, 1, write | next, 0),
    ]);
    // An indirect table outside guest memory, and one of a length that is no table.
    chains.push(vec![raw(end + 0x1000, 32, VRING_DESC_F_INDIRECT as u16, 0)]);
    chains.push(vec![raw(DATA, 17, VRING_DESC_F_INDIRECT as u16, 0)]);
    for chain in chains {
        disk.driver.write_bytes(STATUS, &[0xff]);
        let head = disk.driver.push_raw(0, &chain);
        disk.driver.kick(0);
        assert_eq!(
            disk.driver.take_used(0),
            vec![(u32::from(head), 0)],
            "{chain:?}"
        );
        assert_eq!(disk.driver.read_bytes(STATUS, 1), vec![0xff]);
    }
    // A head index beyond the queue gets nothing back, and stops nothing.
    disk.driver.make_available(0, 40_000);
    disk.driver.kick(0);
    assert_eq!(disk.driver.take_used(0), vec![]);

    // Two IOERRs, six chains without a status, one head beyond the queue; the device lives on.
    assert!(lock(&disk.block).is_activated());
    assert_eq!(lock(&disk.block).counters().failed_requests, 9);
    assert_eq!(
        disk.request(VIRTIO_BLK_T_IN, 9, &[Buffer::writable(DATA, 512)]),
        (OK, 513)
    );
    assert_eq!(disk.driver.read_bytes(DATA, 512), vec![9; 512]);
}

#[test]
fn indirect_descriptor_tables_are_followed() {
    let mut disk = disk(false, ALL_FEATURES);
    let mut header = [0u8; 16];
    header[8..16].copy_from_slice(&12u64.to_le_bytes());
    disk.driver.write_bytes(HEADER, &header);
    let table = DATA + 0x8000;
    let entries: [(u64, u32, u16, u16); 3] = [
        (HEADER, 16, VRING_DESC_F_NEXT as u16, 1),
        (
            DATA,
            512,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            2,
        ),
        (STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (index, (address, len, flags, next)) in entries.into_iter().enumerate() {
        let mut bytes = [0u8; 16];
        bytes[0..8].copy_from_slice(&address.to_le_bytes());
        bytes[8..12].copy_from_slice(&len.to_le_bytes());
        bytes[12..14].copy_from_slice(&flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&next.to_le_bytes());
        disk.driver.write_bytes(table + index as u64 * 16, &bytes);
    }
    let head = disk.driver.push_raw(
        0,
        &[RawDescriptor {
            address: table,
            len: 48,
            flags: VRING_DESC_F_INDIRECT as u16,
            next: 0,
        }],
    );
    disk.driver.kick(0);
    assert_eq!(disk.driver.wait_used(0, 1), vec![(u32::from(head), 513)]);
    assert_eq!(disk.driver.read_bytes(STATUS, 1), vec![OK]);
    assert_eq!(disk.driver.read_bytes(DATA, 512), vec![12; 512]);
}

#[test]
fn the_queue_wraps_around() {
    let mut disk = disk(false, ALL_FEATURES);
    // 16-entry queue, three-descriptor chains, five requests per notification: the ring
    // positions and descriptor slots wrap many times over.
    for round in 0..20u64 {
        let mut heads = Vec::new();
        for slot in 0..5u64 {
            let sector = (round * 5 + slot) % SECTORS;
            let buffer = DATA + slot * 0x1000;
            let status = STATUS + 1 + slot;
            disk.driver.write_bytes(buffer, &[round as u8 + 100; 512]);
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
            header[8..16].copy_from_slice(&sector.to_le_bytes());
            let header_address = HEADER + 0x200 + slot * 16;
            disk.driver.write_bytes(header_address, &header);
            heads.push(u32::from(disk.driver.push_chain(
                0,
                &[
                    Buffer::readable(header_address, 16),
                    Buffer::readable(buffer, 512),
                    Buffer::writable(status, 1),
                ],
            )));
        }
        disk.driver.kick(0);
        let mut used = disk.driver.wait_used(0, 5);
        // Workers finish in any order.
        used.sort_unstable();
        heads.sort_unstable();
        assert_eq!(
            used,
            heads.iter().map(|&head| (head, 1)).collect::<Vec<_>>()
        );
        for slot in 0..5u64 {
            let sector = (round * 5 + slot) % SECTORS;
            assert_eq!(sector_of(&disk.image, sector), vec![round as u8 + 100; 512]);
        }
    }
    // The 16-bit ring indices wrap too.
    for _ in 0..66_000u32 {
        disk.push(VIRTIO_BLK_T_GET_ID, 0, &[Buffer::writable(DATA, 20)]);
        disk.driver.kick(0);
        assert_eq!(disk.driver.take_used(0).len(), 1);
    }
    assert!(lock(&disk.block).is_activated());
    assert_eq!(lock(&disk.block).counters().failed_requests, 0);
    assert_eq!(disk.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
}

#[test]
fn a_reset_mid_flight_drops_pending_requests_and_the_device_starts_over() {
    let mut disk = disk(false, ALL_FEATURES);
    disk.driver.write_bytes(DATA, &[0x77; 512]);
    disk.push(VIRTIO_BLK_T_OUT, 4, &[Buffer::readable(DATA, 512)]);
    // The driver notifies, then resets before the event loop got to the queue.
    disk.driver.write(offset::QUEUE_NOTIFY, 0);
    disk.driver.write(offset::STATUS, 0);
    assert_eq!(disk.driver.status(), 0);
    assert!(!lock(&disk.driver.device).is_activated());
    lock(&disk.driver.device).process_queue(0).unwrap();
    assert_eq!(disk.driver.take_used(0), vec![]);
    assert_eq!(sector_of(&disk.image, 4), vec![4; 512]);

    let _ = disk.driver.transport.queue_events()[0].read();
    disk.driver.initialise(ALL_FEATURES, 16);
    assert_eq!(
        disk.request(VIRTIO_BLK_T_OUT, 4, &[Buffer::readable(DATA, 512)]),
        (OK, 1)
    );
    assert_eq!(sector_of(&disk.image, 4), vec![0x77; 512]);
    assert!(lock(&disk.block).is_activated());
}

#[test]
fn bad_configurations_are_refused_with_a_clear_error() {
    let missing = Block::new(&BlockConfig {
        path: "/nonexistent/cove.img".into(),
        read_only: false,
        id: String::new(),
        direct: false,
    })
    .err()
    .unwrap();
    assert!(
        missing.to_string().contains("/nonexistent/cove.img"),
        "{missing}"
    );
    let image = patterned_image();
    let long_id = Block::new(&BlockConfig {
        path: image.path().to_path_buf(),
        read_only: false,
        id: "a-disk-id-longer-than-twenty-bytes".into(),
        direct: false,
    })
    .err()
    .unwrap();
    assert!(matches!(long_id, BlockError::IdTooLong { len: 34, .. }));
}
