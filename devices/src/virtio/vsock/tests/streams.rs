//! Streams opening and closing: identification and configuration, host- and guest-initiated
//! connections accepted and refused, shutdowns each way, and RSTs for what the device does not
//! know.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use super::*;
use crate::virtio::test_driver::offset;
use crate::virtio::vsock::packet::{SHUTDOWN_BOTH, SHUTDOWN_RECEIVE, SHUTDOWN_SEND};
use crate::virtio::vsock::{VsockError, BUFFER_SIZE, FIRST_HOST_PORT};

#[test]
fn identifies_as_vsock_with_three_queues_and_the_guest_cid_in_its_configuration() {
    let mut guest = Guest::stopped(Timeouts::default());
    assert_eq!(guest.driver.read(offset::DEVICE_ID), 19);
    for queue in 0..3 {
        guest.driver.write(offset::QUEUE_SELECT, queue);
        assert_eq!(guest.driver.read(offset::QUEUE_SIZE_MAX), 256);
    }
    guest.driver.write(offset::QUEUE_SELECT, 3);
    assert_eq!(guest.driver.read(offset::QUEUE_SIZE_MAX), 0);

    let mut cid = [0u8; 8];
    guest.driver.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut low = [0u8; 4];
    guest.driver.read_config(0, &mut low);
    assert_eq!(u32::from_le_bytes(low), GUEST_CID as u32);
    let mut high = [0xffu8; 4];
    guest.driver.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
    // Only VERSION_1 and the transport's ring features: streams are implied.
    assert_eq!(guest.driver.device_features(), COMMON_FEATURES);
}

#[test]
fn reserved_cids_and_unusable_socket_paths_are_refused_with_what_to_do() {
    let directory = tempfile::tempdir().unwrap();
    let socket = directory.path().join("vsock");
    for cid in [
        0,
        1,
        2,
        u64::from(u32::MAX),
        u64::from(u32::MAX) + 1,
        u64::MAX,
    ] {
        let error = Vsock::new(&VsockConfig {
            guest_cid: cid,
            socket: socket.clone(),
        })
        .err()
        .unwrap();
        assert!(matches!(error, VsockError::InvalidCid(c) if c == cid));
        assert!(error.to_string().contains("from 3 to 4294967294"));
    }
    assert!(
        !socket.exists(),
        "a refused device must not create its socket"
    );

    let first = Vsock::new(&VsockConfig {
        guest_cid: 3,
        socket: socket.clone(),
    })
    .unwrap();
    let error = Vsock::new(&VsockConfig {
        guest_cid: 4,
        socket: socket.clone(),
    })
    .err()
    .unwrap();
    assert!(matches!(error, VsockError::SocketExists { .. }));
    assert!(error.to_string().contains("remove it"), "{error}");
    drop(first);

    let long = directory.path().join("x".repeat(120));
    let error = Vsock::new(&VsockConfig {
        guest_cid: 3,
        socket: long,
    })
    .err()
    .unwrap();
    assert!(
        matches!(error, VsockError::SocketPathTooLong { .. }),
        "{error}"
    );

    let missing = directory.path().join("no-such-directory").join("vsock");
    let error = Vsock::new(&VsockConfig {
        guest_cid: 3,
        socket: missing,
    })
    .err()
    .unwrap();
    assert!(matches!(error, VsockError::Bind { .. }), "{error}");
}

#[test]
fn a_host_connect_reaches_a_listening_guest_and_carries_bytes_both_ways() {
    let mut guest = Guest::new();
    let mut host = host_connect(&guest.socket, 1234);
    let request = guest.next_packet();
    assert_eq!(request.op(), Some(Op::Request));
    assert_eq!(request.header.src_cid, HOST_CID);
    assert_eq!(request.header.dst_cid, GUEST_CID);
    assert_eq!(request.header.dst_port, 1234);
    assert!(request.header.src_port >= FIRST_HOST_PORT);
    assert_eq!(request.header.buf_alloc, BUFFER_SIZE);
    assert_eq!(request.header.fwd_cnt, 0);

    let stream = Stream::new(1234, request.header.src_port);
    guest.send(&stream.header(Op::Response, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}\n", stream.host_port));

    host.write_all(b"ping").unwrap();
    let data = guest.next_packet();
    assert!(stream.owns(&data));
    assert_eq!(data.op(), Some(Op::ReadWrite));
    assert_eq!(data.payload, b"ping");

    guest.send_data(&stream, b"pong");
    assert_eq!(read_exactly(&mut host, 4), b"pong");

    // A second host process gets a port of its own.
    let (second, _host) = guest.accept_from_host(1234);
    assert_ne!(second.host_port, stream.host_port);
    assert_eq!(lock(&guest.vsock).counters().open_connections, 2);
}

#[test]
fn a_host_connect_the_guest_refuses_closes_the_host_socket() {
    let mut guest = Guest::new();
    let mut host = host_connect(&guest.socket, 99);
    let request = guest.next_packet();
    assert_eq!(request.op(), Some(Op::Request));
    let stream = Stream::new(99, request.header.src_port);
    guest.send(&stream.header(Op::Reset, 0), &[]);
    assert_end_of_stream(&mut host);
    assert_eq!(lock(&guest.vsock).counters().open_connections, 0);
    guest.expect_silence(Duration::from_millis(50));
}

#[test]
fn a_request_the_guest_never_answers_times_out() {
    let mut guest = Guest::with_timeouts(Timeouts {
        response: Duration::from_millis(100),
        ..Timeouts::default()
    });
    let mut host = host_connect(&guest.socket, 7);
    let request = guest.next_packet();
    assert_eq!(request.op(), Some(Op::Request));
    let reset = guest.next_packet();
    assert_eq!(reset.op(), Some(Op::Reset));
    assert!(Stream::new(7, request.header.src_port).owns(&reset));
    assert_end_of_stream(&mut host);
    // A late answer is for a stream the device no longer knows.
    let stream = Stream::new(7, request.header.src_port);
    guest.send(&stream.header(Op::Response, 0), &[]);
    assert_eq!(guest.next_packet().op(), Some(Op::Reset));
}

#[test]
fn a_guest_connect_reaches_the_listener_at_socket_underscore_port() {
    let mut guest = Guest::new();
    let listener = guest.listen(5000);
    let (stream, mut host) = guest.connect_to_host(&listener, 40_000, 5000);

    guest.send_data(&stream, b"hello host");
    assert_eq!(read_exactly(&mut host, 10), b"hello host");
    host.write_all(b"hello guest").unwrap();
    let data = guest.next_packet();
    assert!(stream.owns(&data));
    assert_eq!(data.payload, b"hello guest");
    assert_eq!(data.header.buf_alloc, BUFFER_SIZE);
    assert_eq!(
        data.header.fwd_cnt, 10,
        "the device consumed the guest's 10 bytes"
    );
}

#[test]
fn a_guest_connect_without_a_host_listener_is_reset() {
    let mut guest = Guest::new();
    let stream = Stream::new(40_001, 5001);
    guest.send(&stream.header(Op::Request, 0), &[]);
    let reset = guest.next_packet();
    assert!(stream.owns(&reset));
    assert_eq!(reset.op(), Some(Op::Reset));

    // A socket file with nobody listening behind it is refused the same way.
    let listener = guest.listen(5002);
    drop(listener);
    let stream = Stream::new(40_002, 5002);
    guest.send(&stream.header(Op::Request, 0), &[]);
    assert_eq!(guest.next_packet().op(), Some(Op::Reset));
    assert_eq!(lock(&guest.vsock).counters().open_connections, 0);
}

#[test]
fn packets_for_unknown_streams_are_answered_with_rst_except_rst() {
    let mut guest = Guest::new();
    let stream = Stream::new(1, 2);
    for op in [
        Op::Response,
        Op::Shutdown,
        Op::CreditUpdate,
        Op::CreditRequest,
    ] {
        guest.send(&stream.header(op, 0), &[]);
        let reset = guest.next_packet();
        assert!(stream.owns(&reset));
        assert_eq!(reset.op(), Some(Op::Reset));
    }
    guest.send_data(&stream, b"lost");
    assert_eq!(guest.next_packet().op(), Some(Op::Reset));
    guest.send(&stream.header(Op::Reset, 0), &[]);
    guest.expect_silence(Duration::from_millis(50));
}

#[test]
fn a_credit_request_is_answered_with_the_devices_credit() {
    let mut guest = Guest::new();
    let listener = guest.listen(5003);
    let (stream, mut host) = guest.connect_to_host(&listener, 40_003, 5003);
    guest.send_data(&stream, b"12345");
    assert_eq!(read_exactly(&mut host, 5), b"12345");
    guest.send(&stream.header(Op::CreditRequest, 0), &[]);
    let update = guest.next_packet();
    assert!(stream.owns(&update));
    assert_eq!(update.op(), Some(Op::CreditUpdate));
    assert_eq!(update.header.buf_alloc, BUFFER_SIZE);
    assert_eq!(update.header.fwd_cnt, 5);
}

#[test]
fn a_host_that_closes_gets_its_last_bytes_delivered_then_a_shutdown() {
    let mut guest = Guest::new();
    let (stream, mut host) = guest.accept_from_host(80);
    host.write_all(b"last words").unwrap();
    drop(host);
    let data = guest.next_packet();
    assert_eq!(data.op(), Some(Op::ReadWrite));
    assert_eq!(data.payload, b"last words");
    let shutdown = guest.next_packet();
    assert!(stream.owns(&shutdown));
    assert_eq!(shutdown.op(), Some(Op::Shutdown));
    assert_eq!(
        shutdown.header.flags, SHUTDOWN_BOTH,
        "a closed host neither sends nor receives"
    );
    // Linux answers a full shutdown with RST; the device then forgets the stream.
    guest.send(&stream.header(Op::Reset, 0), &[]);
    assert_eq!(lock(&guest.vsock).counters().open_connections, 0);
    guest.expect_silence(Duration::from_millis(50));
}

#[test]
fn a_host_that_half_closes_can_still_read_the_guests_answer() {
    let mut guest = Guest::new();
    let (stream, mut host) = guest.accept_from_host(81);
    host.write_all(b"question").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    assert_eq!(guest.next_packet().payload, b"question");
    let shutdown = guest.next_packet();
    assert_eq!(shutdown.op(), Some(Op::Shutdown));
    assert_eq!(shutdown.header.flags, SHUTDOWN_SEND);
    guest.send_data(&stream, b"answer");
    assert_eq!(read_exactly(&mut host, 6), b"answer");
    guest.send(&stream.shutdown(SHUTDOWN_BOTH), &[]);
    assert_eq!(guest.next_packet().op(), Some(Op::Reset));
    assert_end_of_stream(&mut host);
}

#[test]
fn a_guest_shutting_down_both_directions_is_reset_and_the_host_sees_end_of_stream() {
    let mut guest = Guest::new();
    let listener = guest.listen(5004);
    let (stream, mut host) = guest.connect_to_host(&listener, 40_004, 5004);
    guest.send_data(&stream, b"bye");

    // The guest's sending side first: the host reads the bytes, then end of stream, and can
    // still write to the guest.
    guest.send(&stream.shutdown(SHUTDOWN_SEND), &[]);
    let mut everything = Vec::new();
    host.read_to_end(&mut everything).unwrap();
    assert_eq!(everything, b"bye");
    host.write_all(b"still here").unwrap();
    assert_eq!(guest.next_packet().payload, b"still here");

    // Then its receiving side: the stream is over.
    guest.send(&stream.shutdown(SHUTDOWN_RECEIVE), &[]);
    let reset = guest.next_packet();
    assert!(stream.owns(&reset));
    assert_eq!(reset.op(), Some(Op::Reset));
    assert_eq!(lock(&guest.vsock).counters().open_connections, 0);
    assert!(
        host.write_all(&[0; 1024]).is_err(),
        "the device closed its end of the host socket"
    );
}

#[test]
fn a_guest_rst_closes_the_host_socket() {
    let mut guest = Guest::new();
    let (stream, mut host) = guest.accept_from_host(82);
    guest.send(&stream.header(Op::Reset, 0), &[]);
    assert_end_of_stream(&mut host);
    guest.expect_silence(Duration::from_millis(50));
}

#[test]
fn connect_lines_that_are_too_long_malformed_or_late_close_only_their_connection() {
    let mut guest = Guest::with_timeouts(Timeouts {
        connect_line: Duration::from_millis(200),
        ..Timeouts::default()
    });
    let mut too_long = UnixStream::connect(&guest.socket).unwrap();
    too_long.write_all(&[b'9'; 40]).unwrap();
    let mut malformed = UnixStream::connect(&guest.socket).unwrap();
    malformed.write_all(b"CONNECT eighty\n").unwrap();
    let mut silent = UnixStream::connect(&guest.socket).unwrap();
    let mut good = host_connect(&guest.socket, 83);

    let request = guest.next_packet();
    assert_eq!(request.op(), Some(Op::Request));
    assert_eq!(request.header.dst_port, 83);
    wait_for_end_of_stream(&mut guest, &mut too_long);
    wait_for_end_of_stream(&mut guest, &mut malformed);
    wait_for_end_of_stream(&mut guest, &mut silent);

    let stream = Stream::new(83, request.header.src_port);
    guest.send(&stream.header(Op::Response, 0), &[]);
    assert_eq!(read_line(&mut good), format!("OK {}\n", stream.host_port));
    assert!(lock(&guest.vsock).counters().refused_host_connections >= 3);
}

#[test]
fn bytes_sent_right_after_the_connect_line_reach_the_guest() {
    let mut guest = Guest::new();
    let mut host = UnixStream::connect(&guest.socket).unwrap();
    host.set_read_timeout(Some(PATIENCE)).unwrap();
    host.write_all(b"CONNECT 84\r\nearly bytes").unwrap();
    let request = guest.next_packet();
    assert_eq!(request.header.dst_port, 84);
    let stream = Stream::new(84, request.header.src_port);
    guest.send(&stream.header(Op::Response, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}\n", stream.host_port));
    assert_eq!(guest.next_packet().payload, b"early bytes");
}

#[test]
fn host_connections_made_before_the_driver_starts_reach_the_guest_once_it_does() {
    let mut guest = Guest::stopped(Timeouts::default());
    let mut host = host_connect(&guest.socket, 85);
    // The event loop serves the socket before the driver exists, until nothing is left to do.
    assert!(guest.run_backend(PATIENCE));
    let mut turns = 0;
    while guest.run_backend(Duration::from_millis(50)) {
        turns += 1;
        assert!(
            turns < 10,
            "the backend fd stays readable with nothing to do"
        );
    }
    assert_eq!(lock(&guest.vsock).counters().open_connections, 1);
    // Linux resets the device while probing it: the CONNECT is kept for the driver.
    guest.start_driver();
    guest.give_rx();
    let request = guest.next_packet();
    assert_eq!(request.op(), Some(Op::Request));
    assert_eq!(request.header.dst_port, 85);
    let stream = Stream::new(85, request.header.src_port);
    guest.send(&stream.header(Op::Response, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}\n", stream.host_port));
}
