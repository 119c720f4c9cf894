//! Framing: how messages and raw bytes travel over one byte stream.
//!
//! Every frame is an 8-byte header followed by its body:
//!
//! ```text
//! byte 0     protocol version (1)
//! byte 1     frame type: 1 control (a JSON message), 2 data (raw bytes), 3 end of a stream
//! byte 2     stream: 0 for control frames; 1 stdin, 2 stdout, 3 stderr, 4 file otherwise
//! byte 3     reserved, 0
//! bytes 4-7  body length, big-endian; at most 64 KiB for control frames, 1 MiB for data
//!            frames, 0 for end-of-stream frames
//! ```
//!
//! A frame that breaks any of these rules is an error for the whole connection: the reader
//! cannot know where the next frame would start. What a message means, and which frames may
//! come when, is for `protocol::messages` and the two sides.

use std::io::{self, IoSlice, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The protocol version this crate speaks, in every frame header and in the hello messages.
pub const VERSION: u8 = 1;
/// The header's size.
pub const HEADER_LEN: usize = 8;
/// The longest control frame body (one JSON message).
pub const MAX_CONTROL_LEN: usize = 64 * 1024;
/// The longest data frame body.
pub const MAX_DATA_LEN: usize = 1024 * 1024;
/// The body size senders use for bulk data: big enough that the header is noise, small
/// enough that stdin, stdout and signals interleave.
pub const DATA_CHUNK: usize = 256 * 1024;

const TYPE_CONTROL: u8 = 1;
const TYPE_DATA: u8 = 2;
const TYPE_END: u8 = 3;

/// The byte streams a connection can carry besides its control messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Stdin,
    Stdout,
    Stderr,
    /// A file's content (push and pull).
    File,
}

impl Channel {
    fn number(self) -> u8 {
        match self {
            Channel::Stdin => 1,
            Channel::Stdout => 2,
            Channel::Stderr => 3,
            Channel::File => 4,
        }
    }

    fn from_number(number: u8) -> Option<Self> {
        match number {
            1 => Some(Channel::Stdin),
            2 => Some(Channel::Stdout),
            3 => Some(Channel::Stderr),
            4 => Some(Channel::File),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Channel::Stdin => "stdin",
            Channel::Stdout => "stdout",
            Channel::Stderr => "stderr",
            Channel::File => "file",
        }
    }
}

/// One frame, with its control message already parsed into `M`.
#[derive(Debug, PartialEq)]
pub enum Frame<M> {
    Control(M),
    Data(Channel, Vec<u8>),
    End(Channel),
}

/// What can be wrong with a frame, or with the stream it came from.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the connection failed")]
    Io(#[source] io::Error),
    #[error("the connection ended in the middle of a frame")]
    Truncated,
    #[error("the frame is for protocol version {found}; this side speaks version {VERSION}")]
    Version { found: u8 },
    #[error("unknown frame type {0} (1 is control, 2 data, 3 end of stream)")]
    UnknownType(u8),
    #[error("unknown stream number {0} (1 stdin, 2 stdout, 3 stderr, 4 file)")]
    UnknownChannel(u8),
    #[error("the header's reserved byte is {0}; it must be 0")]
    Reserved(u8),
    #[error("a control frame must name stream 0, not {0}")]
    ControlWithChannel(u8),
    #[error("a data or end-of-stream frame must name a stream")]
    NoChannel,
    #[error("a {kind} frame of {length} bytes is longer than the limit of {limit} bytes")]
    TooLong {
        kind: &'static str,
        length: u32,
        limit: usize,
    },
    #[error("an end-of-stream frame must be empty, this one has {0} bytes")]
    EndWithBody(u32),
    #[error("the control message is malformed")]
    Message(#[source] serde_json::Error),
}

impl FrameError {
    /// True when the peer simply went away (rather than sending something wrong).
    pub fn is_disconnect(&self) -> bool {
        match self {
            FrameError::Truncated => true,
            FrameError::Io(error) => matches!(
                error.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

/// A checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    Control { length: u32 },
    Data { channel: Channel, length: u32 },
    End { channel: Channel },
}

/// Checks the 8 header bytes against every rule in the module documentation.
pub fn parse_header(bytes: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let [version, frame_type, channel, reserved, l0, l1, l2, l3] = *bytes;
    if version != VERSION {
        return Err(FrameError::Version { found: version });
    }
    if reserved != 0 {
        return Err(FrameError::Reserved(reserved));
    }
    let length = u32::from_be_bytes([l0, l1, l2, l3]);
    let channel_of = |number: u8| -> Result<Channel, FrameError> {
        if number == 0 {
            return Err(FrameError::NoChannel);
        }
        Channel::from_number(number).ok_or(FrameError::UnknownChannel(number))
    };
    match frame_type {
        TYPE_CONTROL => {
            if channel != 0 {
                return Err(FrameError::ControlWithChannel(channel));
            }
            check_length("control", length, MAX_CONTROL_LEN)?;
            Ok(Header::Control { length })
        }
        TYPE_DATA => {
            let channel = channel_of(channel)?;
            check_length("data", length, MAX_DATA_LEN)?;
            Ok(Header::Data { channel, length })
        }
        TYPE_END => {
            let channel = channel_of(channel)?;
            if length != 0 {
                return Err(FrameError::EndWithBody(length));
            }
            Ok(Header::End { channel })
        }
        other => Err(FrameError::UnknownType(other)),
    }
}

fn check_length(kind: &'static str, length: u32, limit: usize) -> Result<(), FrameError> {
    if length as usize > limit {
        return Err(FrameError::TooLong {
            kind,
            length,
            limit,
        });
    }
    Ok(())
}

fn header_bytes(frame_type: u8, channel: u8, length: usize) -> [u8; HEADER_LEN] {
    let length = (length as u32).to_be_bytes();
    [
        VERSION, frame_type, channel, 0, length[0], length[1], length[2], length[3],
    ]
}

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    reader: R,
}

impl<R: Read> FrameReader<R> {
    pub fn new(reader: R) -> Self {
        Self { reader }
    }

    pub fn get_ref(&self) -> &R {
        &self.reader
    }

    /// The next frame, or `None` when the stream ended cleanly between frames.
    pub fn read<M: DeserializeOwned>(&mut self) -> Result<Option<Frame<M>>, FrameError> {
        let mut header = [0u8; HEADER_LEN];
        if !self.fill(&mut header, true)? {
            return Ok(None);
        }
        match parse_header(&header)? {
            Header::Control { length } => {
                let mut body = vec![0u8; length as usize];
                self.fill(&mut body, false)?;
                let message = serde_json::from_slice(&body).map_err(FrameError::Message)?;
                Ok(Some(Frame::Control(message)))
            }
            Header::Data { channel, length } => {
                let mut body = vec![0u8; length as usize];
                self.fill(&mut body, false)?;
                Ok(Some(Frame::Data(channel, body)))
            }
            Header::End { channel } => Ok(Some(Frame::End(channel))),
        }
    }

    /// Fills `buffer`; returns false if the stream ended before its first byte and
    /// `end_allowed`.
    fn fill(&mut self, buffer: &mut [u8], end_allowed: bool) -> Result<bool, FrameError> {
        let mut filled = 0;
        while filled < buffer.len() {
            match self.reader.read(&mut buffer[filled..]) {
                Ok(0) if filled == 0 && end_allowed => return Ok(false),
                Ok(0) => return Err(FrameError::Truncated),
                Ok(read) => filled += read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(FrameError::Io(error)),
            }
        }
        Ok(true)
    }
}

/// Writes frames to a byte stream, each header and body in one vectored write where the
/// stream takes it (one packet on vsock instead of two).
pub struct FrameWriter<W> {
    writer: W,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(writer: W) -> Self {
        Self { writer }
    }

    pub fn get_ref(&self) -> &W {
        &self.writer
    }

    /// Sends one control message.
    pub fn control<M: Serialize>(&mut self, message: &M) -> Result<(), FrameError> {
        let body = serde_json::to_vec(message).map_err(FrameError::Message)?;
        if body.len() > MAX_CONTROL_LEN {
            return Err(FrameError::TooLong {
                kind: "control",
                length: u32::try_from(body.len()).unwrap_or(u32::MAX),
                limit: MAX_CONTROL_LEN,
            });
        }
        self.frame(TYPE_CONTROL, 0, &body)
    }

    /// Sends `bytes` on `channel`, in as many data frames as needed.
    pub fn data(&mut self, channel: Channel, bytes: &[u8]) -> Result<(), FrameError> {
        for chunk in bytes.chunks(MAX_DATA_LEN) {
            self.frame(TYPE_DATA, channel.number(), chunk)?;
        }
        Ok(())
    }

    /// Ends `channel`.
    pub fn end(&mut self, channel: Channel) -> Result<(), FrameError> {
        self.frame(TYPE_END, channel.number(), &[])
    }

    fn frame(&mut self, frame_type: u8, channel: u8, body: &[u8]) -> Result<(), FrameError> {
        let header = header_bytes(frame_type, channel, body.len());
        let mut slices = [IoSlice::new(&header), IoSlice::new(body)];
        let mut slices: &mut [IoSlice] = &mut slices;
        while !slices.is_empty() && slices.iter().any(|slice| !slice.is_empty()) {
            match self.writer.write_vectored(slices) {
                Ok(0) => {
                    return Err(FrameError::Io(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the connection took no bytes",
                    )))
                }
                Ok(written) => IoSlice::advance_slices(&mut slices, written),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(FrameError::Io(error)),
            }
        }
        self.writer.flush().map_err(FrameError::Io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ping {
        n: u32,
    }

    fn header(bytes: [u8; 8]) -> Result<Header, FrameError> {
        parse_header(&bytes)
    }

    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        let mut writer = FrameWriter::new(&mut wire);
        writer.control(&Ping { n: 7 }).unwrap();
        writer.data(Channel::Stdout, b"hello").unwrap();
        writer.end(Channel::Stdout).unwrap();
        writer.data(Channel::File, &[]).unwrap();
        assert_eq!(&wire[..8], &[1, 1, 0, 0, 0, 0, 0, 7]);
        let mut reader = FrameReader::new(&wire[..]);
        assert_eq!(
            reader.read::<Ping>().unwrap(),
            Some(Frame::Control(Ping { n: 7 }))
        );
        assert_eq!(
            reader.read::<Ping>().unwrap(),
            Some(Frame::Data(Channel::Stdout, b"hello".to_vec()))
        );
        assert_eq!(
            reader.read::<Ping>().unwrap(),
            Some(Frame::End(Channel::Stdout))
        );
        // Empty data writes no frame at all.
        assert_eq!(reader.read::<Ping>().unwrap(), None);
    }

    #[test]
    fn long_data_is_split_into_frames_within_the_limit() {
        let bytes = vec![5u8; MAX_DATA_LEN * 2 + 3];
        let mut wire = Vec::new();
        FrameWriter::new(&mut wire)
            .data(Channel::Stdin, &bytes)
            .unwrap();
        let mut reader = FrameReader::new(&wire[..]);
        let mut lengths = Vec::new();
        while let Some(frame) = reader.read::<Ping>().unwrap() {
            match frame {
                Frame::Data(Channel::Stdin, body) => lengths.push(body.len()),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(lengths, [MAX_DATA_LEN, MAX_DATA_LEN, 3]);
    }

    #[test]
    fn header_rules() {
        assert_eq!(
            header([1, 1, 0, 0, 0, 1, 0, 0]).unwrap(),
            Header::Control { length: 65536 }
        );
        assert_eq!(
            header([1, 2, 4, 0, 0, 16, 0, 0]).unwrap(),
            Header::Data {
                channel: Channel::File,
                length: 1 << 20
            }
        );
        assert_eq!(
            header([1, 3, 1, 0, 0, 0, 0, 0]).unwrap(),
            Header::End {
                channel: Channel::Stdin
            }
        );
        assert!(matches!(
            header([2, 1, 0, 0, 0, 0, 0, 2]),
            Err(FrameError::Version { found: 2 })
        ));
        assert!(matches!(
            header([0, 1, 0, 0, 0, 0, 0, 2]),
            Err(FrameError::Version { found: 0 })
        ));
        assert!(matches!(
            header([1, 9, 0, 0, 0, 0, 0, 2]),
            Err(FrameError::UnknownType(9))
        ));
        assert!(matches!(
            header([1, 0, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::UnknownType(0))
        ));
        assert!(matches!(
            header([1, 1, 0, 7, 0, 0, 0, 2]),
            Err(FrameError::Reserved(7))
        ));
        assert!(matches!(
            header([1, 1, 2, 0, 0, 0, 0, 2]),
            Err(FrameError::ControlWithChannel(2))
        ));
        assert!(matches!(
            header([1, 2, 0, 0, 0, 0, 0, 2]),
            Err(FrameError::NoChannel)
        ));
        assert!(matches!(
            header([1, 2, 5, 0, 0, 0, 0, 2]),
            Err(FrameError::UnknownChannel(5))
        ));
        assert!(matches!(
            header([1, 3, 1, 0, 0, 0, 0, 1]),
            Err(FrameError::EndWithBody(1))
        ));
    }

    #[test]
    fn oversized_frames_are_refused_before_any_body_is_read() {
        assert!(matches!(
            header([1, 1, 0, 0, 0, 1, 0, 1]),
            Err(FrameError::TooLong {
                kind: "control",
                length: 65537,
                ..
            })
        ));
        assert!(matches!(
            header([1, 2, 2, 0, 0, 16, 0, 1]),
            Err(FrameError::TooLong { kind: "data", .. })
        ));
        assert!(matches!(
            header([1, 2, 2, 0, 255, 255, 255, 255]),
            Err(FrameError::TooLong {
                length: u32::MAX,
                ..
            })
        ));
        // The reader stops at the header: it never tries to allocate or read 4 GiB.
        let wire = [1u8, 1, 0, 0, 255, 255, 255, 255];
        assert!(matches!(
            FrameReader::new(&wire[..]).read::<Ping>(),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn truncated_streams() {
        // Clean end between frames.
        assert!(FrameReader::new(&[][..]).read::<Ping>().unwrap().is_none());
        // Inside the header.
        let error = FrameReader::new(&[1u8, 1, 0][..])
            .read::<Ping>()
            .unwrap_err();
        assert!(matches!(error, FrameError::Truncated));
        assert!(error.is_disconnect());
        // Inside the body.
        let wire = [1u8, 2, 1, 0, 0, 0, 0, 10, 1, 2, 3];
        assert!(matches!(
            FrameReader::new(&wire[..]).read::<Ping>(),
            Err(FrameError::Truncated)
        ));
    }

    #[test]
    fn malformed_control_bodies() {
        for body in [
            &b"not json"[..],
            b"{\"n\": -1}",
            b"{\"n\": 1, \"extra\": true}",
            b"{}",
            b"",
            b"{\"n\": 1.5}",
            b"\xff\xfe",
        ] {
            let mut wire = header_bytes(TYPE_CONTROL, 0, body.len()).to_vec();
            wire.extend_from_slice(body);
            let error = FrameReader::new(&wire[..]).read::<Ping>().unwrap_err();
            assert!(
                matches!(error, FrameError::Message(_)),
                "{body:?}: {error:?}"
            );
            assert!(!error.is_disconnect());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic generator: every prefix of some noise, and noise after a
        // valid header.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut noise = Vec::new();
        for _ in 0..4096 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            noise.push(state as u8);
        }
        for start in 0..256 {
            let mut reader = FrameReader::new(&noise[start..]);
            while let Ok(Some(_)) = reader.read::<Ping>() {}
        }
        for length in 0..64 {
            let mut wire = header_bytes(TYPE_CONTROL, 0, length).to_vec();
            wire.extend_from_slice(&noise[..length]);
            let _ = FrameReader::new(&wire[..]).read::<Ping>();
        }
    }
}
