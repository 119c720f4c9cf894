//! The transport driven as a driver would: identification, the status steps, feature
//! negotiation, queue setup rules, interrupts and reset. The device behind it is the real
//! virtio-rng, the simplest one.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

use crate::bus::{lock, BusDevice};
use crate::virtio::rng::Rng;
use crate::virtio::test_driver::{offset, Buffer, TestDriver, DATA_START, STATUS_RUNNING};
use crate::virtio::{VirtioDevice, COMMON_FEATURES};

const ACKNOWLEDGED: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;

fn rng_driver() -> (TestDriver, Arc<Mutex<Rng>>) {
    let rng = Arc::new(Mutex::new(Rng::new()));
    (TestDriver::new(rng.clone()), rng)
}

#[test]
fn identifies_itself_as_a_modern_virtio_mmio_device() {
    let (mut driver, _) = rng_driver();
    assert_eq!(driver.read(offset::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(driver.read(offset::VERSION), 2);
    assert_eq!(driver.read(offset::DEVICE_ID), 4);
    let features = driver.device_features();
    assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(features & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
    driver.write(offset::DEVICE_FEATURES_SELECT, 2);
    assert_eq!(driver.read(offset::DEVICE_FEATURES), 0);
    assert_eq!(driver.read(offset::CONFIG_GENERATION), 0);
    assert_eq!(driver.read(offset::QUEUE_SIZE_MAX), 256);
    driver.write(offset::QUEUE_SELECT, 1);
    assert_eq!(
        driver.read(offset::QUEUE_SIZE_MAX),
        0,
        "queue 1 does not exist"
    );
    assert_eq!(driver.status(), 0);
}

#[test]
fn status_bits_follow_the_spec_order() {
    let (mut driver, rng) = rng_driver();
    // DRIVER before ACKNOWLEDGE, FEATURES_OK before DRIVER: refused.
    driver.write(offset::STATUS, VIRTIO_CONFIG_S_DRIVER);
    assert_eq!(driver.status(), 0);
    driver.write(offset::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    driver.write(
        offset::STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(driver.status(), VIRTIO_CONFIG_S_ACKNOWLEDGE);
    driver.write(offset::STATUS, ACKNOWLEDGED);
    assert_eq!(driver.status(), ACKNOWLEDGED);
    // Clearing a bit, or setting the device-only NEEDS_RESET, is refused.
    driver.write(offset::STATUS, VIRTIO_CONFIG_S_DRIVER);
    driver.write(offset::STATUS, ACKNOWLEDGED | VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(driver.status(), ACKNOWLEDGED);
    // DRIVER_OK before FEATURES_OK is refused.
    driver.write(offset::STATUS, ACKNOWLEDGED | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(driver.status(), ACKNOWLEDGED);
    assert!(driver.transport.ignored_accesses() >= 5);
    assert!(!lock(&rng).is_activated());

    driver.initialise(COMMON_FEATURES, 16);
    assert_eq!(driver.status(), STATUS_RUNNING);
    assert!(lock(&rng).is_activated());

    // FAILED may be added at any time and activates nothing more.
    driver.write(offset::STATUS, STATUS_RUNNING | VIRTIO_CONFIG_S_FAILED);
    assert_eq!(driver.status(), STATUS_RUNNING | VIRTIO_CONFIG_S_FAILED);
}

#[test]
fn features_ok_is_refused_for_features_not_offered_or_without_version_1() {
    let (mut driver, _) = rng_driver();
    assert!(!driver.negotiate(0), "a legacy driver must be refused");
    assert_eq!(driver.status(), ACKNOWLEDGED);
    assert!(!driver.negotiate(COMMON_FEATURES | 1 << 5));
    assert!(!driver.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << 63)));
    assert!(driver.negotiate(1 << VIRTIO_F_VERSION_1));
    assert!(driver.negotiate(COMMON_FEATURES));

    // After FEATURES_OK the driver features are frozen.
    driver.write(offset::DRIVER_FEATURES_SELECT, 0);
    driver.write(offset::DRIVER_FEATURES, 0xffff_ffff);
    let status = driver.status();
    driver.write(offset::STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(
        driver.status() & VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_DRIVER_OK
    );
}

#[test]
fn driver_features_written_before_driver_status_are_ignored() {
    let (mut driver, _) = rng_driver();
    driver.write(offset::DRIVER_FEATURES_SELECT, 1);
    driver.write(offset::DRIVER_FEATURES, 1);
    driver.write(offset::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    driver.write(offset::STATUS, ACKNOWLEDGED);
    // The high word was never accepted, so VERSION_1 is missing and FEATURES_OK is refused.
    driver.write(offset::STATUS, ACKNOWLEDGED | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(driver.status(), ACKNOWLEDGED);
}

#[test]
fn accesses_of_the_wrong_size_and_writes_to_read_only_registers_are_ignored() {
    let (mut driver, _) = rng_driver();
    let mut narrow = [0xaau8; 2];
    driver.transport.read(0, &mut narrow);
    assert_eq!(narrow, [0, 0]);
    let mut unaligned = [0xaau8; 4];
    driver.transport.read(2, &mut unaligned);
    assert_eq!(unaligned, [0; 4]);
    let mut wide = [0xaau8; 8];
    driver.transport.read(0, &mut wide);
    assert_eq!(wide, [0; 8]);
    driver.transport.write(u64::from(offset::STATUS), &[1]);
    driver.write(offset::MAGIC_VALUE, 0);
    driver.write(offset::DEVICE_ID, 7);
    driver.write(offset::INTERRUPT_STATUS, 1);
    driver.write(0x0f0, 1);
    assert_eq!(driver.transport.ignored_accesses(), 8);
    assert_eq!(driver.read(offset::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(driver.read(offset::DEVICE_ID), 4);
    assert_eq!(driver.status(), 0);
}

#[test]
fn queues_are_configured_only_between_features_ok_and_driver_ok() {
    let (mut driver, _) = rng_driver();
    driver.write(offset::QUEUE_SIZE, 16);
    assert_eq!(driver.transport.ignored_accesses(), 1, "before FEATURES_OK");
    assert!(driver.negotiate(COMMON_FEATURES));
    // Not a power of two, larger than the maximum, misaligned rings: refused.
    let ignored = driver.transport.ignored_accesses();
    driver.write(offset::QUEUE_SIZE, 3);
    driver.write(offset::QUEUE_SIZE, 512);
    driver.write(offset::QUEUE_DESCRIPTORS_LOW, 0x1001);
    driver.write(offset::QUEUE_USED_LOW, 0x1002);
    driver.write(offset::QUEUE_READY, 2);
    assert_eq!(driver.transport.ignored_accesses(), ignored + 5);

    driver.setup_queue(0, 16);
    let status = driver.status();
    driver.write(offset::STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
    let ignored = driver.transport.ignored_accesses();
    driver.write(offset::QUEUE_READY, 0);
    driver.write(offset::QUEUE_SIZE, 8);
    driver.write(offset::QUEUE_DESCRIPTORS_LOW, 0x8000);
    assert_eq!(driver.transport.ignored_accesses(), ignored + 3);
    assert_eq!(driver.read(offset::QUEUE_READY), 1);
}

#[test]
fn used_buffers_raise_the_interrupt_until_acknowledged() {
    let (mut driver, _) = rng_driver();
    driver.initialise(COMMON_FEATURES, 16);
    driver.push_chain(0, &[Buffer::writable(DATA_START, 16)]);
    driver.kick(0);
    let interrupt = driver.transport.interrupt().clone();
    assert_eq!(interrupt.event().read().unwrap(), 1);
    assert_eq!(driver.read(offset::INTERRUPT_STATUS), 1);
    driver.write(offset::INTERRUPT_ACK, 1);
    assert_eq!(driver.read(offset::INTERRUPT_STATUS), 0);

    // Notifying a queue that does not exist signals nothing.
    let ignored = driver.transport.ignored_accesses();
    driver.write(offset::QUEUE_NOTIFY, 5);
    assert_eq!(driver.transport.ignored_accesses(), ignored + 1);
}

#[test]
fn a_queue_outside_guest_memory_makes_the_device_need_a_reset() {
    let (mut driver, rng) = rng_driver();
    assert!(driver.negotiate(COMMON_FEATURES));
    driver.setup_queue(0, 16);
    // Move the used ring past the end of guest memory.
    driver.write(offset::QUEUE_USED_LOW, 0);
    driver.write(offset::QUEUE_USED_HIGH, 1);
    let status = driver.status();
    driver.write(offset::STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_ne!(driver.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(driver.transport.activation_error().is_some());
    assert!(!lock(&rng).is_activated());
    // Linux writes back what it read plus FAILED; echoing NEEDS_RESET is allowed.
    let status = driver.status();
    driver.write(offset::STATUS, status | VIRTIO_CONFIG_S_FAILED);
    assert_eq!(driver.status(), status | VIRTIO_CONFIG_S_FAILED);

    // A reset clears it and the device can be set up properly.
    driver.initialise(COMMON_FEATURES, 16);
    assert_eq!(driver.status(), STATUS_RUNNING);
    assert!(driver.transport.activation_error().is_none());
}

#[test]
fn writing_zero_resets_everything_and_the_device_can_be_set_up_again() {
    let (mut driver, rng) = rng_driver();
    driver.initialise(COMMON_FEATURES, 16);
    driver.push_chain(0, &[Buffer::writable(DATA_START, 16)]);
    driver.kick(0);
    assert_eq!(driver.read(offset::INTERRUPT_STATUS), 1);

    driver.write(offset::STATUS, 0);
    assert_eq!(driver.status(), 0);
    assert_eq!(driver.read(offset::INTERRUPT_STATUS), 0);
    assert_eq!(driver.read(offset::QUEUE_READY), 0);
    assert!(!lock(&rng).is_activated());
    // The event loop may still deliver a late notification: it does nothing.
    lock(&rng).process_queue(0).unwrap();

    driver.initialise(COMMON_FEATURES, 32);
    let head = driver.push_chain(0, &[Buffer::writable(DATA_START, 16)]);
    driver.kick(0);
    assert_eq!(driver.take_used(0), vec![(u32::from(head), 16)]);
}

#[test]
fn notifications_that_reach_the_transport_are_counted_and_a_failed_device_needs_a_reset() {
    let (mut driver, _) = rng_driver();
    driver.initialise(COMMON_FEATURES, 16);
    assert_eq!(driver.transport.trapped_notifications(), 0);
    driver.push_chain(0, &[Buffer::writable(DATA_START, 8)]);
    driver.kick(0);
    driver.kick(0);
    assert_eq!(driver.transport.trapped_notifications(), 2);

    assert!(!driver.transport.needs_reset());
    driver
        .transport
        .device_failed(crate::virtio::VirtioError::NoSuchQueue { queue_index: 7 });
    assert!(driver.transport.needs_reset());
    assert_ne!(driver.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(
        driver.read(offset::INTERRUPT_STATUS) & 2,
        2,
        "a configuration-change interrupt tells the driver"
    );
    driver.write(offset::STATUS, 0);
    assert!(!driver.transport.needs_reset(), "a reset clears it");
}
