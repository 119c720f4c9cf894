//! Bytes and credit: a megabyte each way through a small guest buffer, the device's own credit
//! updates, streams interleaved, and a backend fd that goes quiet when the guest can take
//! nothing.

use std::io::{Read, Write};
use std::thread;

use super::*;
use crate::virtio::vsock::BUFFER_SIZE;

const MEGABYTE: usize = 1 << 20;

/// Where two byte strings first differ, for failure messages that do not print a megabyte.
fn first_difference(left: &[u8], right: &[u8]) -> Option<usize> {
    left.iter()
        .zip(right)
        .position(|(a, b)| a != b)
        .or((left.len() != right.len()).then(|| left.len().min(right.len())))
}

/// Waits for a host thread while still serving the device: the last bytes the guest sent may
/// still wait for the host socket to drain.
fn join_serving<T>(guest: &mut Guest, host: thread::JoinHandle<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    while !host.is_finished() {
        assert!(Instant::now() < deadline, "the host thread did not finish");
        guest.run_backend(Duration::from_millis(10));
    }
    host.join().unwrap()
}

/// The device's credit as the guest tracks it from the packets it receives.
struct DeviceCredit {
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl DeviceCredit {
    fn take(&mut self, packet: &Packet) {
        self.buf_alloc = packet.header.buf_alloc;
        self.fwd_cnt = packet.header.fwd_cnt;
    }

    /// How much more the guest may send after `sent` bytes.
    fn left(&self, sent: usize) -> usize {
        let in_flight = (sent as u32).wrapping_sub(self.fwd_cnt);
        self.buf_alloc.saturating_sub(in_flight) as usize
    }
}

#[test]
fn a_megabyte_each_way_through_a_small_guest_buffer_stalls_on_credit_and_resumes() {
    // Not a multiple of the receive buffers' 4 KiB: the credit, not the buffer, must cut the
    // last packet before each stall.
    const GUEST_BUFFER: u32 = 10_000;
    let mut guest = Guest::new();
    let listener = guest.listen(6000);
    let to_guest = pattern(MEGABYTE, 1);
    let to_host = pattern(MEGABYTE, 2);
    let host_sends = to_guest.clone();
    let host = thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut writer = socket.try_clone().unwrap();
        let writing = thread::spawn(move || writer.write_all(&host_sends).unwrap());
        let mut received = vec![0u8; MEGABYTE];
        socket.read_exact(&mut received).unwrap();
        writing.join().unwrap();
        received
    });

    let mut stream = Stream::new(40_100, 6000);
    stream.buf_alloc = GUEST_BUFFER;
    guest.send(&stream.header(Op::Request, 0), &[]);
    let response = guest.next_packet();
    assert_eq!(response.op(), Some(Op::Response));
    let mut credit = DeviceCredit {
        buf_alloc: response.header.buf_alloc,
        fwd_cnt: response.header.fwd_cnt,
    };

    let mut received = Vec::with_capacity(MEGABYTE);
    let mut sent = 0;
    let mut stalls = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.len() < MEGABYTE || sent < MEGABYTE {
        assert!(
            Instant::now() < deadline,
            "stuck after receiving {} and sending {sent} bytes",
            received.len()
        );
        loop {
            let len = credit.left(sent).min(4096).min(MEGABYTE - sent);
            if len == 0 {
                break;
            }
            guest.send(
                &stream.header(Op::ReadWrite, len),
                &to_host[sent..sent + len],
            );
            sent += len;
        }
        guest.run_backend(Duration::from_millis(5));
        while let Some(packet) = guest.received.pop_front() {
            assert!(stream.owns(&packet), "{packet:?}");
            credit.take(&packet);
            match packet.op() {
                Some(Op::ReadWrite) => {
                    received.extend_from_slice(&packet.payload);
                    let in_flight = received.len() - stream.fwd_cnt as usize;
                    assert!(
                        in_flight <= GUEST_BUFFER as usize,
                        "the device sent {in_flight} bytes on {GUEST_BUFFER} bytes of credit"
                    );
                }
                Some(Op::CreditUpdate) => {}
                // The host closes once it has everything; its SHUTDOWN may follow the last data.
                Some(Op::Shutdown) if received.len() == MEGABYTE => {}
                _ => panic!("unexpected {packet:?}"),
            }
        }
        // The guest consumes only a full buffer: the device must stop exactly at the credit it
        // was given and go on when told of more.
        if received.len() - stream.fwd_cnt as usize == GUEST_BUFFER as usize {
            stalls += 1;
            stream.fwd_cnt = received.len() as u32;
            guest.send(&stream.header(Op::CreditUpdate, 0), &[]);
        }
    }
    assert_eq!(stalls, MEGABYTE / GUEST_BUFFER as usize);
    assert_eq!(first_difference(&received, &to_guest), None);
    let host_received = join_serving(&mut guest, host);
    assert_eq!(first_difference(&host_received, &to_host), None);
}

#[test]
fn a_guest_sending_a_megabyte_is_kept_going_by_the_devices_credit_updates() {
    let mut guest = Guest::new();
    let listener = guest.listen(6001);
    let to_host = pattern(MEGABYTE, 3);
    let host = thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut received = vec![0u8; MEGABYTE];
        socket.read_exact(&mut received).unwrap();
        received
    });
    let stream = Stream::new(40_101, 6001);
    guest.send(&stream.header(Op::Request, 0), &[]);
    let response = guest.next_packet();
    assert_eq!(response.op(), Some(Op::Response));
    let mut credit = DeviceCredit {
        buf_alloc: response.header.buf_alloc,
        fwd_cnt: response.header.fwd_cnt,
    };
    let mut sent = 0;
    let mut updates = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent < MEGABYTE {
        assert!(
            Instant::now() < deadline,
            "stuck after sending {sent} bytes"
        );
        let len = credit.left(sent).min(4096).min(MEGABYTE - sent);
        if len > 0 {
            guest.send(
                &stream.header(Op::ReadWrite, len),
                &to_host[sent..sent + len],
            );
            sent += len;
            continue;
        }
        // Out of credit: only a CREDIT_UPDATE from the device lets the guest go on.
        let update = guest.next_packet();
        assert!(stream.owns(&update));
        assert_eq!(update.op(), Some(Op::CreditUpdate), "{update:?}");
        assert_eq!(update.header.buf_alloc, BUFFER_SIZE);
        credit.take(&update);
        updates += 1;
    }
    assert!(updates >= 3, "{updates} credit updates for a megabyte");
    assert_eq!(
        first_difference(&join_serving(&mut guest, host), &to_host),
        None
    );
}

#[test]
fn streams_interleave_without_mixing_their_bytes() {
    let mut guest = Guest::new();
    let listener = guest.listen(6002);
    let mut streams = Vec::new();
    for index in 0..3 {
        streams.push(guest.connect_to_host(&listener, 41_000 + index, 6002));
    }
    for port in [90, 91, 92] {
        streams.push(guest.accept_from_host(port));
    }
    let mut to_guest = vec![Vec::new(); streams.len()];
    let mut to_host = vec![Vec::new(); streams.len()];
    for round in 0..20 {
        for (index, (stream, host)) in streams.iter_mut().enumerate() {
            let from_host = format!("host {index} round {round};");
            host.write_all(from_host.as_bytes()).unwrap();
            to_guest[index].extend_from_slice(from_host.as_bytes());
            let from_guest = format!("guest {index} round {round};");
            guest.send_data(stream, from_guest.as_bytes());
            to_host[index].extend_from_slice(from_guest.as_bytes());
        }
    }
    for (index, (_, host)) in streams.iter_mut().enumerate() {
        assert_eq!(read_exactly(host, to_host[index].len()), to_host[index]);
    }
    let mut received = vec![Vec::new(); streams.len()];
    while received
        .iter()
        .zip(&to_guest)
        .any(|(got, wanted)| got.len() < wanted.len())
    {
        let packet = guest.next_packet();
        assert_eq!(packet.op(), Some(Op::ReadWrite), "{packet:?}");
        let index = streams
            .iter()
            .position(|(stream, _)| stream.owns(&packet))
            .expect("a packet for no stream");
        received[index].extend_from_slice(&packet.payload);
    }
    assert_eq!(received, to_guest);
}

#[test]
fn without_credit_the_backend_fd_stays_quiet_until_the_guest_gives_some() {
    let mut guest = Guest::new();
    let mut host = host_connect(&guest.socket, 93);
    let request = guest.next_packet();
    let mut stream = Stream::new(93, request.header.src_port);
    stream.buf_alloc = 5000;
    guest.send(&stream.header(Op::Response, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}\n", stream.host_port));

    let bytes = pattern(20_000, 4);
    host.write_all(&bytes).unwrap();
    let mut received = Vec::new();
    while received.len() < 5000 {
        received.extend(guest.next_packet().payload);
    }
    assert_eq!(
        received.len(),
        5000,
        "the device sent past the guest's credit"
    );
    assert!(
        !guest.backend_ready(Duration::from_millis(100)),
        "with no credit left the backend fd must not be readable"
    );

    stream.fwd_cnt = 5000;
    stream.buf_alloc = 64 * 1024;
    guest.send(&stream.header(Op::CreditUpdate, 0), &[]);
    while received.len() < bytes.len() {
        received.extend(guest.next_packet().payload);
    }
    assert_eq!(received, bytes);
    assert!(!guest.backend_ready(Duration::from_millis(100)));
}

#[test]
fn without_receive_buffers_the_backend_fd_stays_quiet_until_the_driver_adds_some() {
    let mut guest = Guest::stopped(Timeouts::default());
    guest.start_driver();
    guest.refill = false;
    guest.give_some_rx(2);
    let mut host = host_connect(&guest.socket, 94);
    let request = guest.next_packet();
    let stream = Stream::new(94, request.header.src_port);
    guest.send(&stream.header(Op::Response, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}\n", stream.host_port));

    let bytes = pattern(10_000, 5);
    host.write_all(&bytes).unwrap();
    let first = guest.next_packet();
    assert_eq!(first.payload.len(), RX_PAYLOAD as usize);
    // One more turn finds the ring empty; from then on the fd must stay quiet.
    guest.run_backend(Duration::from_millis(50));
    assert!(
        !guest.backend_ready(Duration::from_millis(100)),
        "with no receive buffers the backend fd must not be readable"
    );
    assert!(guest.received.is_empty());

    guest.give_some_rx(4);
    let mut received = first.payload;
    while received.len() < bytes.len() {
        received.extend(guest.next_packet().payload);
    }
    assert_eq!(received, bytes);
}

#[test]
fn a_guest_sending_past_its_credit_is_reset() {
    let mut guest = Guest::stopped(Timeouts::default());
    guest.start_driver();
    guest.refill = false;
    guest.give_some_rx(1);
    let listener = guest.listen(6003);
    let (stream, mut host) = guest.connect_to_host(&listener, 41_100, 6003);
    // With its receive ring empty the guest hears of no consumed bytes: its credit is exactly
    // the device's buffer, however much the host socket took.
    let bytes = pattern(BUFFER_SIZE as usize, 6);
    guest.send_data(&stream, &bytes);
    assert_eq!(lock(&guest.vsock).counters().open_connections, 1);
    guest.send_data(&stream, b"one too many");
    assert_eq!(lock(&guest.vsock).counters().open_connections, 0);

    // The host gets a prefix of what was sent, then end of stream.
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert!(!got.is_empty() && got.len() <= bytes.len());
    assert_eq!(first_difference(&got, &bytes[..got.len()]), None);

    guest.give_some_rx(4);
    let reset = guest.next_packet();
    assert!(stream.owns(&reset));
    assert_eq!(reset.op(), Some(Op::Reset));
}
