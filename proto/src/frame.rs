//! Connector framing: a 4-byte little-endian length, then one protobuf message.
//!
//! Both ends use these helpers so the framing lives in one place.

use prost::Message;

/// Why a frame could not be taken from the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announced more bytes than allowed.
    TooLarge {
        /// Announced length.
        len: usize,
        /// Allowed maximum.
        max: usize,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max}")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Appends `msg` as one frame to `out`.
///
/// ```
/// use kvtier_proto::frame::{encode_into, FrameDecoder};
/// use kvtier_proto::v1::Hello;
/// let mut buf = Vec::new();
/// encode_into(&Hello { client_name: "x".into(), protocol_version: 1, engine: None }, &mut buf);
/// let mut dec = FrameDecoder::new(1024);
/// dec.extend(&buf);
/// let body = dec.next_frame().unwrap().unwrap();
/// assert_eq!(<Hello as prost::Message>::decode(&body[..]).unwrap().client_name, "x");
/// ```
pub fn encode_into<M: Message>(msg: &M, out: &mut Vec<u8>) {
    let len = msg.encoded_len();
    out.reserve(super::FRAME_HEADER_BYTES + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    msg.encode(out).expect("Vec grows as needed");
}

/// `msg` as one frame.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(msg, &mut out);
    out
}

/// Splits a byte stream into frame bodies, refusing lengths above a limit before buffering them.
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max: usize,
}

impl FrameDecoder {
    /// A decoder accepting bodies of at most `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { buf: Vec::new(), start: 0, max: max_frame_bytes }
    }

    /// Frees the buffer if it holds no unread byte: a connection waiting for its next request
    /// then holds no heap (thousands of idle connections cost kilobytes, not gigabytes).
    pub fn release_idle(&mut self) {
        if self.start == self.buf.len() {
            self.buf = Vec::new();
            self.start = 0;
        }
    }

    /// Bytes of heap the buffer holds now.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Adds bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// A buffer to read into directly; call [`commit`](Self::commit) with the bytes read.
    pub fn spare(&mut self, at_least: usize) -> &mut [u8] {
        self.compact();
        let len = self.buf.len();
        self.buf.resize(len + at_least, 0);
        &mut self.buf[len..]
    }

    /// Keeps `n` bytes of the last [`spare`](Self::spare) buffer, drops the rest.
    pub fn commit(&mut self, n: usize, asked: usize) {
        let len = self.buf.len();
        self.buf.truncate(len - asked + n);
    }

    fn compact(&mut self) {
        if self.start > 0 && (self.start == self.buf.len() || self.start > 64 * 1024) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame body, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < super::FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let body = avail[4..4 + len].to_vec();
        self.start += 4 + len;
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{request, Request, Stats};

    #[test]
    fn splits_pipelined_frames_fed_byte_by_byte() {
        let mut bytes = Vec::new();
        for id in 0..3 {
            encode_into(&Request { id, op: Some(request::Op::Stats(Stats {})) }, &mut bytes);
        }
        let mut dec = FrameDecoder::new(1024);
        let mut ids = Vec::new();
        for b in bytes {
            dec.extend(&[b]);
            while let Some(body) = dec.next_frame().unwrap() {
                ids.push(Request::decode(&body[..]).unwrap().id);
            }
        }
        assert_eq!(ids, vec![0, 1, 2]);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn refuses_oversized_length_before_the_body_arrives() {
        let mut dec = FrameDecoder::new(16);
        dec.extend(&1000u32.to_le_bytes());
        assert_eq!(dec.next_frame(), Err(FrameError::TooLarge { len: 1000, max: 16 }));
    }

    #[test]
    fn spare_and_commit_keep_only_read_bytes() {
        let frame = encode(&Stats {});
        let mut dec = FrameDecoder::new(16);
        let spare = dec.spare(64);
        spare[..frame.len()].copy_from_slice(&frame);
        dec.commit(frame.len(), 64);
        assert_eq!(dec.next_frame().unwrap(), Some(vec![]));
    }

    #[test]
    fn an_idle_decoder_holds_no_buffer_and_keeps_partial_frames() {
        let frame = encode(&Request { id: 9, op: Some(request::Op::Stats(Stats {})) });
        let mut dec = FrameDecoder::new(1024);
        assert_eq!(dec.capacity(), 0, "nothing before the first read");
        dec.extend(&frame[..3]);
        dec.release_idle();
        assert_eq!(dec.buffered(), 3, "a partial frame is kept");
        dec.extend(&frame[3..]);
        assert!(dec.next_frame().unwrap().is_some());
        dec.release_idle();
        assert_eq!((dec.capacity(), dec.buffered()), (0, 0));
    }
}
