//! The on-disk format, as pure functions of bytes: no I/O, no clock.
//!
//! A log directory holds segment files `seg-<first_seq, 20 digits>.log` of a fixed size and a
//! `checkpoint` file. Every multi-byte integer is little-endian.
//!
//! Segment file:
//! ```text
//! 0      4096-byte header block: magic "SGBUFSEG", version u32, 0u32, first_seq u64,
//!        segment_bytes u64, created_at_ms i64, CRC32C of the 40 bytes before it; zeros
//! 4096   record, record, ... each 8-byte aligned, then zeros to the end of the file
//! ```
//! Record:
//! ```text
//! 0   magic u32 ("SGR1")      4   payload length u32
//! 8   seq u64                 16  CRC32C over seq, length and payload
//! 20  0u32 (reserved)         24  payload: timestamp_ms i64, kind u8, key length u16, key,
//!                                 value; then zero padding to a multiple of 8
//! ```
//! A header of 24 zero bytes is the end of data: segments are preallocated (reads of the
//! unwritten tail return zeros) and every write pads its last block with zeros.
//!
//! Checkpoint file: two 4096-byte slots, each magic "SGBUFCKP", version u32, 0u32,
//! generation u64, delivered_seq u64, CRC32C of the 32 bytes before it. The valid slot with the
//! highest generation wins; a write goes to the other slot, so a torn write leaves the
//! previous checkpoint readable.

/// The unit of direct I/O and of the format: headers, slots and partial writes are blocks.
pub const BLOCK: usize = 4096;
/// Bytes before the first record of a segment.
pub const SEGMENT_HEADER_BYTES: u64 = BLOCK as u64;
/// Records start at multiples of this.
pub const RECORD_ALIGN: usize = 8;
/// The record header: magic, length, seq, CRC, reserved.
pub const RECORD_HEADER_BYTES: usize = 24;
/// Payload bytes before the key: timestamp, kind, key length.
pub const PAYLOAD_FIXED_BYTES: usize = 11;
/// Size of the checkpoint file: two slots.
pub const CHECKPOINT_FILE_BYTES: u64 = 2 * BLOCK as u64;
/// Version written in segment headers and checkpoint slots.
pub const FORMAT_VERSION: u32 = 1;

const SEGMENT_MAGIC: [u8; 8] = *b"SGBUFSEG";
const CHECKPOINT_MAGIC: [u8; 8] = *b"SGBUFCKP";
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"SGR1");

/// What a record carries, so that the reader can route it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// A metrics record bound for the main topic.
    Metrics = 0,
    /// A rejected line bound for the dead-letter topic.
    DeadLetter = 1,
}

impl RecordKind {
    fn from_u8(b: u8) -> Option<RecordKind> {
        match b {
            0 => Some(RecordKind::Metrics),
            1 => Some(RecordKind::DeadLetter),
            _ => None,
        }
    }
}

/// One record, borrowed from the bytes it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    /// Its place in the log: contiguous from the first record ever appended.
    pub seq: u64,
    /// When the line was accepted, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Metrics or dead letter.
    pub kind: RecordKind,
    /// The Kafka key.
    pub key: &'a [u8],
    /// The Kafka value.
    pub value: &'a [u8],
}

/// Bytes a record with this key and value occupies in a segment, padding included.
#[inline]
pub fn record_len(key_len: usize, value_len: usize) -> usize {
    align_up(
        RECORD_HEADER_BYTES + PAYLOAD_FIXED_BYTES + key_len + value_len,
        RECORD_ALIGN,
    )
}

/// Rounds `v` up to a multiple of `align` (a power of two).
#[inline]
pub const fn align_up(v: usize, align: usize) -> usize {
    (v + align - 1) & !(align - 1)
}

/// Rounds `v` down to a multiple of `align` (a power of two).
#[inline]
pub const fn align_down(v: usize, align: usize) -> usize {
    v & !(align - 1)
}

/// The CRC a record header carries: over seq, payload length and payload.
fn record_crc(seq: u64, payload: &[u8]) -> u32 {
    let mut head = [0u8; 12];
    head[..8].copy_from_slice(&seq.to_le_bytes());
    head[8..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

/// Writes one record at the start of `dst`, padding included, and returns its length.
///
/// `dst` must hold [`record_len`] bytes; the caller checked the key fits in a u16.
#[inline]
pub fn encode_record(
    dst: &mut [u8],
    seq: u64,
    timestamp_ms: i64,
    kind: RecordKind,
    key: &[u8],
    value: &[u8],
) -> usize {
    let total = record_len(key.len(), value.len());
    let payload_len = PAYLOAD_FIXED_BYTES + key.len() + value.len();
    let dst = &mut dst[..total];
    let (head, rest) = dst.split_at_mut(RECORD_HEADER_BYTES);
    let (payload, pad) = rest.split_at_mut(payload_len);
    payload[..8].copy_from_slice(&timestamp_ms.to_le_bytes());
    payload[8] = kind as u8;
    payload[9..11].copy_from_slice(&(key.len() as u16).to_le_bytes());
    payload[11..11 + key.len()].copy_from_slice(key);
    payload[11 + key.len()..].copy_from_slice(value);
    pad.fill(0);
    head[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    head[4..8].copy_from_slice(&(payload_len as u32).to_le_bytes());
    head[8..16].copy_from_slice(&seq.to_le_bytes());
    head[16..20].copy_from_slice(&record_crc(seq, payload).to_le_bytes());
    head[20..24].fill(0);
    total
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidRecord {
    /// The first four bytes are not the record magic (and the header is not all zero).
    Magic,
    /// The payload length is impossible (too short, over the limit, or past the segment).
    Length,
    /// The CRC does not match the bytes.
    Checksum,
    /// The CRC matches but the sequence number is not the next one expected.
    Sequence {
        /// The sequence number the record carries.
        found: u64,
    },
    /// The CRC matches but the payload is malformed (unknown kind, key longer than payload,
    /// reserved bytes set).
    Payload,
}

/// The outcome of decoding the bytes at a record position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A valid record and the bytes it occupies (padding included).
    Record(RecordView<'a>, usize),
    /// 24 zero bytes: the end of data.
    End,
    /// Not a record.
    Invalid(InvalidRecord),
    /// `buf` is too short to tell; at least this many bytes are needed.
    Incomplete(usize),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes the record at the start of `buf`.
///
/// `expected_seq`: the sequence number the record must carry (`None` accepts any, for
/// resynchronising after damage). `max_record_bytes` bounds the whole record; `buf` ends
/// where the segment (or what is known of it) ends, and a record longer than the bytes
/// available is `Incomplete` with the length needed, unless it is longer than
/// `max_record_bytes`, which makes it invalid.
pub fn parse_record(buf: &[u8], expected_seq: Option<u64>, max_record_bytes: usize) -> Parsed<'_> {
    if buf.len() < RECORD_HEADER_BYTES {
        return Parsed::Incomplete(RECORD_HEADER_BYTES);
    }
    let head = &buf[..RECORD_HEADER_BYTES];
    let magic = u32_at(head, 0);
    if magic != RECORD_MAGIC {
        if head.iter().all(|&b| b == 0) {
            return Parsed::End;
        }
        return Parsed::Invalid(InvalidRecord::Magic);
    }
    let payload_len = u32_at(head, 4) as usize;
    if payload_len < PAYLOAD_FIXED_BYTES {
        return Parsed::Invalid(InvalidRecord::Length);
    }
    let total = align_up(RECORD_HEADER_BYTES + payload_len, RECORD_ALIGN);
    if total > max_record_bytes {
        return Parsed::Invalid(InvalidRecord::Length);
    }
    if buf.len() < total {
        return Parsed::Incomplete(total);
    }
    let seq = u64_at(head, 8);
    let payload = &buf[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload_len];
    if u32_at(head, 16) != record_crc(seq, payload) {
        return Parsed::Invalid(InvalidRecord::Checksum);
    }
    if let Some(expected) = expected_seq
        && seq != expected
    {
        return Parsed::Invalid(InvalidRecord::Sequence { found: seq });
    }
    match decode_payload(seq, payload, u32_at(head, 20)) {
        Some(view) => Parsed::Record(view, total),
        None => Parsed::Invalid(InvalidRecord::Payload),
    }
}

fn decode_payload(seq: u64, payload: &[u8], reserved: u32) -> Option<RecordView<'_>> {
    let kind = RecordKind::from_u8(payload[8])?;
    let key_len = u16::from_le_bytes([payload[9], payload[10]]) as usize;
    if reserved != 0 || PAYLOAD_FIXED_BYTES + key_len > payload.len() {
        return None;
    }
    let (key, value) = payload[PAYLOAD_FIXED_BYTES..].split_at(key_len);
    Some(RecordView {
        seq,
        timestamp_ms: i64::from_le_bytes(payload[..8].try_into().expect("8 bytes")),
        kind,
        key,
        value,
    })
}

/// Decodes a record the log itself wrote into memory and never left its hands: no CRC check.
///
/// Panics if the bytes are not a record: that would be a bug in the writer, not damage.
pub(crate) fn decode_trusted(buf: &[u8]) -> (RecordView<'_>, usize) {
    let payload_len = u32_at(buf, 4) as usize;
    let total = align_up(RECORD_HEADER_BYTES + payload_len, RECORD_ALIGN);
    let payload = &buf[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload_len];
    let view = decode_payload(u64_at(buf, 8), payload, 0).expect("the log's own record");
    debug_assert_eq!(u32_at(buf, 0), RECORD_MAGIC);
    (view, total)
}

/// The fields of a segment's header block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Sequence number of the segment's first record.
    pub first_seq: u64,
    /// The file's size when it was created.
    pub segment_bytes: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

/// What a segment's first block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderState {
    /// A valid header.
    Valid(SegmentHeader),
    /// All zeros: the header was never written (a crash right after the file was created).
    Zero,
    /// Anything else.
    Damaged,
}

impl SegmentHeader {
    /// Writes the header block (the whole block: zeros after the fields).
    pub fn encode(&self, block: &mut [u8]) {
        let block = &mut block[..BLOCK];
        block.fill(0);
        block[0..8].copy_from_slice(&SEGMENT_MAGIC);
        block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        block[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        block[24..32].copy_from_slice(&self.segment_bytes.to_le_bytes());
        block[32..40].copy_from_slice(&self.created_at_ms.to_le_bytes());
        let crc = crc32c::crc32c(&block[..40]);
        block[40..44].copy_from_slice(&crc.to_le_bytes());
    }

    /// Reads a header block (at least [`BLOCK`] bytes, or it is damaged).
    pub fn decode(block: &[u8]) -> HeaderState {
        if block.len() < BLOCK {
            return if block.iter().all(|&b| b == 0) {
                HeaderState::Zero
            } else {
                HeaderState::Damaged
            };
        }
        let block = &block[..BLOCK];
        if block.iter().all(|&b| b == 0) {
            return HeaderState::Zero;
        }
        let valid = block[0..8] == SEGMENT_MAGIC
            && u32_at(block, 8) == FORMAT_VERSION
            && u32_at(block, 40) == crc32c::crc32c(&block[..40]);
        if !valid {
            return HeaderState::Damaged;
        }
        HeaderState::Valid(SegmentHeader {
            first_seq: u64_at(block, 16),
            segment_bytes: u64_at(block, 24),
            created_at_ms: i64::from_le_bytes(block[32..40].try_into().expect("8 bytes")),
        })
    }
}

/// One checkpoint slot's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointSlot {
    /// Increases by one with every checkpoint written; the highest valid one wins.
    pub generation: u64,
    /// Every record with a sequence number up to this one was delivered.
    pub delivered_seq: u64,
}

impl CheckpointSlot {
    /// The slot (0 or 1) this checkpoint is written to: alternating by generation.
    pub fn slot(&self) -> usize {
        (self.generation % 2) as usize
    }

    /// Writes the slot block (the whole block).
    pub fn encode(&self, block: &mut [u8]) {
        let block = &mut block[..BLOCK];
        block.fill(0);
        block[0..8].copy_from_slice(&CHECKPOINT_MAGIC);
        block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        block[16..24].copy_from_slice(&self.generation.to_le_bytes());
        block[24..32].copy_from_slice(&self.delivered_seq.to_le_bytes());
        let crc = crc32c::crc32c(&block[..32]);
        block[32..36].copy_from_slice(&crc.to_le_bytes());
    }

    /// Reads a slot block; `None` if it is not a valid slot.
    pub fn decode(block: &[u8]) -> Option<CheckpointSlot> {
        if block.len() < 36 {
            return None;
        }
        let valid = block[0..8] == CHECKPOINT_MAGIC
            && u32_at(block, 8) == FORMAT_VERSION
            && u32_at(block, 32) == crc32c::crc32c(&block[..32]);
        valid.then(|| CheckpointSlot {
            generation: u64_at(block, 16),
            delivered_seq: u64_at(block, 24),
        })
    }

    /// The checkpoint a file holds: the valid slot with the highest generation.
    pub fn pick(file: &[u8]) -> Option<CheckpointSlot> {
        let slot = |i: usize| file.get(i * BLOCK..(i + 1) * BLOCK).and_then(Self::decode);
        match (slot(0), slot(1)) {
            (Some(a), Some(b)) => Some(if a.generation >= b.generation { a } else { b }),
            (a, b) => a.or(b),
        }
    }
}

const SEGMENT_PREFIX: &str = "seg-";
const SEGMENT_SUFFIX: &str = ".log";

/// The file name of the segment whose first record is `first_seq`.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:020}{SEGMENT_SUFFIX}")
}

/// The first sequence number a segment file name carries, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut buf = vec![0xAA; record_len(key.len(), value.len())];
        let n = encode_record(
            &mut buf,
            seq,
            1_700_000_000_000,
            RecordKind::Metrics,
            key,
            value,
        );
        assert_eq!(n, buf.len());
        buf
    }

    #[test]
    fn a_record_round_trips_and_is_eight_byte_aligned() {
        let buf = record(7, b"10115", b"{\"t\":1}");
        assert_eq!(buf.len() % RECORD_ALIGN, 0);
        match parse_record(&buf, Some(7), 1 << 20) {
            Parsed::Record(v, n) => {
                assert_eq!(n, buf.len());
                assert_eq!(
                    (v.seq, v.key, v.value),
                    (7, &b"10115"[..], &b"{\"t\":1}"[..])
                );
                assert_eq!(v.timestamp_ms, 1_700_000_000_000);
                assert_eq!(v.kind, RecordKind::Metrics);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(decode_trusted(&buf).0.value, b"{\"t\":1}");
    }

    #[test]
    fn every_single_flipped_byte_is_detected() {
        let buf = record(3, b"k", b"some value bytes");
        let payload_end = RECORD_HEADER_BYTES + PAYLOAD_FIXED_BYTES + 1 + 16;
        for i in 0..payload_end {
            let mut bad = buf.clone();
            bad[i] ^= 0x01;
            assert!(
                !matches!(parse_record(&bad, Some(3), 1 << 20), Parsed::Record(..)),
                "flip at {i} accepted"
            );
        }
    }

    #[test]
    fn sequence_zero_header_length_and_limit_are_checked() {
        let buf = record(5, b"", b"v");
        assert_eq!(
            parse_record(&buf, Some(6), 1 << 20),
            Parsed::Invalid(InvalidRecord::Sequence { found: 5 })
        );
        assert!(matches!(
            parse_record(&buf, None, 1 << 20),
            Parsed::Record(..)
        ));
        assert_eq!(parse_record(&[0; 64], Some(1), 1 << 20), Parsed::End);
        assert_eq!(
            parse_record(&buf[..30], Some(5), 1 << 20),
            Parsed::Incomplete(buf.len())
        );
        assert_eq!(
            parse_record(&buf, Some(5), buf.len() - 8),
            Parsed::Invalid(InvalidRecord::Length)
        );
    }

    #[test]
    fn segment_header_and_checkpoint_slots_round_trip_and_detect_damage() {
        let h = SegmentHeader {
            first_seq: 42,
            segment_bytes: 1 << 20,
            created_at_ms: 9,
        };
        let mut block = vec![0u8; BLOCK];
        h.encode(&mut block);
        assert_eq!(SegmentHeader::decode(&block), HeaderState::Valid(h));
        block[17] ^= 1;
        assert_eq!(SegmentHeader::decode(&block), HeaderState::Damaged);
        assert_eq!(SegmentHeader::decode(&[0; BLOCK]), HeaderState::Zero);

        let mut file = vec![0u8; 2 * BLOCK];
        let a = CheckpointSlot {
            generation: 4,
            delivered_seq: 100,
        };
        let b = CheckpointSlot {
            generation: 5,
            delivered_seq: 150,
        };
        a.encode(&mut file[a.slot() * BLOCK..]);
        b.encode(&mut file[b.slot() * BLOCK..]);
        assert_eq!(CheckpointSlot::pick(&file), Some(b));
        file[BLOCK + 30] ^= 1; // damage slot 1 (generation 5)
        assert_eq!(CheckpointSlot::pick(&file), Some(a));
        file[10] ^= 1;
        assert_eq!(CheckpointSlot::pick(&file), None);
    }

    #[test]
    fn segment_names_round_trip_and_reject_lookalikes() {
        assert_eq!(segment_file_name(17), "seg-00000000000000000017.log");
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        for bad in [
            "seg-17.log",
            "seg-0000000000000000001x.log",
            "seg-00000000000000000017.tmp",
        ] {
            assert_eq!(parse_segment_file_name(bad), None, "{bad}");
        }
    }
}
