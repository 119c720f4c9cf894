//! A hostile or broken guest, and a crowd of host processes: malformed packets and receive
//! chains fail alone, protocol violations reset only their stream, limits refuse cleanly, and a
//! reset mid-flight closes every host socket and leaves a device that works again.

use std::io::{ErrorKind, Read, Write};

use super::*;
use crate::virtio::test_driver::{offset, MEMORY_SIZE};
use crate::virtio::vsock::MAX_HANDSHAKES;

#[test]
fn malformed_transmit_packets_are_dropped_and_a_good_one_after_them_still_works() {
    let mut guest = Guest::new();
    let listener = guest.listen(7000);
    let (stream, mut host) = guest.connect_to_host(&listener, 42_000, 7000);
    let stranger = Stream::new(42_001, 7001);

    let wrong_source = Header {
        src_cid: GUEST_CID + 1,
        ..stream.header(Op::ReadWrite, 4)
    };
    guest.send(&wrong_source, b"evil");
    let wrong_destination = Header {
        dst_cid: GUEST_CID,
        ..stream.header(Op::ReadWrite, 4)
    };
    guest.send(&wrong_destination, b"evil");
    let unknown_op = Header {
        op: 99,
        ..stranger.header(Op::ReadWrite, 0)
    };
    guest.send(&unknown_op, &[]);
    let seqpacket = Header {
        kind: 2,
        ..stranger.header(Op::Request, 0)
    };
    guest.send(&seqpacket, &[]);
    // The header announces 10 bytes, the chain carries 4.
    let long_header = stranger.header(Op::ReadWrite, 10);
    guest.send(&long_header, b"evil");

    let header_at = DATA_START + 0x3_0000;
    guest
        .driver
        .write_bytes(header_at, &stranger.header(Op::ReadWrite, 8).to_bytes());
    // The payload runs past the end of guest memory.
    guest.send_chain(&[
        Buffer::readable(header_at, HEADER_SIZE as u32),
        Buffer::readable(MEMORY_SIZE - 4, 8),
    ]);
    // A device-writable buffer in a transmit chain.
    guest.send_chain(&[
        Buffer::readable(header_at, HEADER_SIZE as u32),
        Buffer::writable(header_at + 0x100, 8),
    ]);
    // A header shorter than 44 bytes, and one outside guest memory.
    guest.send_chain(&[Buffer::readable(header_at, 20)]);
    guest.send_chain(&[Buffer::readable(MEMORY_SIZE - 10, HEADER_SIZE as u32)]);
    guest.send_chain(&[Buffer::readable(u64::MAX - 10, HEADER_SIZE as u32)]);

    guest.expect_silence(Duration::from_millis(50));
    let counters = lock(&guest.vsock).counters();
    assert_eq!(counters.dropped_packets, 10);
    assert_eq!(counters.open_connections, 1);

    guest.send_data(&stream, b"still fine");
    assert_eq!(
        read_exactly(&mut host, 10),
        b"still fine",
        "nothing evil arrived first"
    );

    // A malformed packet that names a live stream resets that stream.
    guest.send(&stream.header(Op::ReadWrite, 10), b"evil");
    let reset = guest.next_packet();
    assert!(stream.owns(&reset));
    assert_eq!(reset.op(), Some(Op::Reset));
    assert_end_of_stream(&mut host);
}

#[test]
fn malformed_receive_chains_come_back_empty_and_the_packet_takes_the_next_one() {
    let mut guest = Guest::stopped(Timeouts::default());
    guest.start_driver();
    let scratch = DATA_START + 0x3_0000;
    let bad = [
        guest
            .driver
            .push_chain(0, &[Buffer::readable(scratch, 100)]),
        guest
            .driver
            .push_chain(0, &[Buffer::writable(MEMORY_SIZE - 10, 100)]),
        guest.driver.push_chain(0, &[Buffer::writable(scratch, 20)]),
        guest.driver.push_chain(
            0,
            &[
                Buffer::writable(scratch, 44),
                Buffer::readable(scratch + 0x100, 8),
            ],
        ),
    ];
    guest.give_some_rx(1);
    let mut host = host_connect(&guest.socket, 97);
    let request = guest.next_packet();
    assert_eq!(request.op(), Some(Op::Request));
    assert_eq!(request.header.dst_port, 97);
    let returned: Vec<(u32, u32)> = bad.iter().map(|&head| (u32::from(head), 0)).collect();
    assert_eq!(guest.stray_used, returned);
    assert_eq!(lock(&guest.vsock).counters().bad_rx_chains, 4);
    assert_eq!(guest.driver.read_bytes(scratch, 20), vec![0; 20]);

    let stream = Stream::new(97, request.header.src_port);
    guest.send(&stream.header(Op::Response, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}\n", stream.host_port));
}

#[test]
fn protocol_violations_reset_only_their_stream() {
    let mut guest = Guest::new();
    let (bystander, mut bystander_host) = guest.accept_from_host(100);

    // Data before answering a REQUEST.
    let mut early = host_connect(&guest.socket, 101);
    let request = guest.next_packet();
    let stream = Stream::new(101, request.header.src_port);
    guest.send_data(&stream, b"too soon");
    assert_eq!(guest.next_packet().op(), Some(Op::Reset));
    assert_end_of_stream(&mut early);

    // A second REQUEST, and a RESPONSE nobody asked for, on live streams.
    let (stream, mut host) = guest.accept_from_host(102);
    guest.send(&stream.header(Op::Request, 0), &[]);
    assert_eq!(guest.next_packet().op(), Some(Op::Reset));
    assert_end_of_stream(&mut host);
    let (stream, mut host) = guest.accept_from_host(103);
    guest.send(&stream.header(Op::Response, 0), &[]);
    assert_eq!(guest.next_packet().op(), Some(Op::Reset));
    assert_end_of_stream(&mut host);

    // A RESPONSE for a REQUEST the device never sent is not a stream.
    let guessed = Stream::new(104, FIRST_PORT_GUESS);
    guest.send(&guessed.header(Op::Response, 0), &[]);
    assert_eq!(guest.next_packet().op(), Some(Op::Reset));

    bystander_host.write_all(b"unharmed").unwrap();
    let data = guest.next_packet();
    assert!(bystander.owns(&data));
    assert_eq!(data.payload, b"unharmed");
    assert_eq!(lock(&guest.vsock).counters().open_connections, 1);
}

/// A host port the device has not handed out in `protocol_violations_reset_only_their_stream`.
const FIRST_PORT_GUESS: u32 = crate::virtio::vsock::FIRST_HOST_PORT + 1000;

#[test]
fn beyond_the_handshake_limit_new_host_connections_are_closed_and_the_others_live_on() {
    let mut guest = Guest::new();
    let mut waiting: Vec<UnixStream> = (0..MAX_HANDSHAKES)
        .map(|_| UnixStream::connect(&guest.socket).unwrap())
        .collect();
    let mut refused = UnixStream::connect(&guest.socket).unwrap();
    wait_for_end_of_stream(&mut guest, &mut refused);
    for host in &mut waiting {
        host.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let error = host.read(&mut byte).unwrap_err();
        assert_eq!(
            error.kind(),
            ErrorKind::WouldBlock,
            "a waiting host was closed"
        );
        host.set_nonblocking(false).unwrap();
    }
    assert_eq!(lock(&guest.vsock).counters().refused_host_connections, 1);

    let mut last = waiting.pop().unwrap();
    last.set_read_timeout(Some(PATIENCE)).unwrap();
    last.write_all(b"CONNECT 105\n").unwrap();
    let request = guest.next_packet();
    assert_eq!(request.header.dst_port, 105);
    let stream = Stream::new(105, request.header.src_port);
    guest.send(&stream.header(Op::Response, 0), &[]);
    assert_eq!(read_line(&mut last), format!("OK {}\n", stream.host_port));
}

#[test]
fn a_reset_mid_flight_closes_host_sockets_and_the_device_works_after_reinitialisation() {
    let mut guest = Guest::new();
    let listener = guest.listen(7002);
    let (guest_initiated, mut to_listener) = guest.connect_to_host(&listener, 42_100, 7002);
    let (_, mut from_host) = guest.accept_from_host(106);
    from_host.write_all(b"in flight").unwrap();
    guest.send_data(&guest_initiated, b"also in flight");

    guest.driver.write(offset::STATUS, 0);
    assert!(!lock(&guest.vsock).is_activated());
    assert_eq!(lock(&guest.vsock).counters().open_connections, 0);
    assert_eq!(read_exactly(&mut to_listener, 14), b"also in flight");
    assert_end_of_stream(&mut to_listener);
    assert_end_of_stream(&mut from_host);
    assert!(
        !guest.backend_ready(Duration::from_millis(50)),
        "a reset device has nothing to do"
    );

    guest.start_driver();
    guest.give_rx();
    let (stream, mut host) = guest.accept_from_host(107);
    host.write_all(b"again").unwrap();
    let data = guest.next_packet();
    assert!(stream.owns(&data));
    assert_eq!(data.payload, b"again");
    guest.send_data(&stream, b"back");
    assert_eq!(read_exactly(&mut host, 4), b"back");

    let (stream, mut host) = guest.connect_to_host(&listener, 42_101, 7002);
    guest.send_data(&stream, b"and out");
    assert_eq!(read_exactly(&mut host, 7), b"and out");
}
