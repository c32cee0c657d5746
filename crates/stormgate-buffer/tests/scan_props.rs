//! The segment reader on arbitrary bytes: only valid records, or a clean stop; never a panic,
//! never a record that was not written.

use proptest::prelude::*;
use stormgate_buffer::format::{
    BLOCK, Parsed, RecordKind, SegmentHeader, encode_record, parse_record, record_len,
};
use stormgate_buffer::scan::{Stop, scan_segment};

const MAX_RECORD: usize = 4096;

/// A segment image with these records (values given by length and fill byte).
fn image(first_seq: u64, values: &[(usize, u8)], size: usize) -> (Vec<u8>, Vec<usize>) {
    let mut seg = vec![0u8; size];
    SegmentHeader {
        first_seq,
        segment_bytes: size as u64,
        created_at_ms: 0,
    }
    .encode(&mut seg);
    let mut offsets = Vec::new();
    let mut pos = BLOCK;
    for (i, &(len, fill)) in values.iter().enumerate() {
        let value = vec![fill; len];
        if pos + record_len(2, len) > size {
            break;
        }
        offsets.push(pos);
        pos += encode_record(
            &mut seg[pos..],
            first_seq + i as u64,
            i as i64,
            RecordKind::Metrics,
            b"k1",
            &value,
        );
    }
    (seg, offsets)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_every_record_found_is_valid(
        bytes in proptest::collection::vec(any::<u8>(), 0..20_000),
        name_seq in any::<u64>(),
    ) {
        let scan = scan_segment(&bytes[..], name_seq, MAX_RECORD, None, 8192).unwrap();
        prop_assert!(scan.end <= bytes.len().max(BLOCK) as u64);
        // Walk the prefix the scan accepted: every record in it parses, in sequence.
        let mut pos = BLOCK;
        for i in 0..scan.records {
            match parse_record(&bytes[pos..], Some(scan.first_seq + i), MAX_RECORD) {
                Parsed::Record(_, len) => pos += len,
                other => prop_assert!(false, "record {} at {}: {:?}", i, pos, other),
            }
        }
        if scan.records > 0 {
            prop_assert_eq!(pos as u64, scan.end);
        }
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(
        tail in proptest::collection::vec(any::<u8>(), 0..20_000),
        first in 1u64..1_000_000,
    ) {
        let mut bytes = vec![0u8; BLOCK];
        SegmentHeader { first_seq: first, segment_bytes: 0, created_at_ms: 0 }.encode(&mut bytes);
        bytes.extend_from_slice(&tail);
        let scan = scan_segment(&bytes[..], first, MAX_RECORD, Some(first + 3), 8192).unwrap();
        prop_assert_eq!(scan.first_seq, first);
        if let Some(p) = scan.resume {
            prop_assert!(p.seq > first + 3 && p.seq < first + scan.records);
        }
    }

    #[test]
    fn damage_anywhere_leaves_exactly_a_prefix_of_what_was_written(
        values in proptest::collection::vec((0usize..600, any::<u8>()), 1..120),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let (mut seg, offsets) = image(1000, &values, 64 * 1024);
        let written = offsets.len() as u64;
        for (at, x) in &flips {
            let i = at.index(seg.len());
            seg[i] ^= x;
        }
        if let Some(c) = cut {
            let keep = c.index(seg.len());
            seg.truncate(keep);
        }
        let scan = scan_segment(&seg[..], 1000, MAX_RECORD, None, 8192).unwrap();
        prop_assert!(scan.records <= written);
        // Each record of the prefix is the one written at that place, byte for byte.
        for (i, &off) in offsets.iter().take(scan.records as usize).enumerate() {
            match parse_record(&seg[off..], Some(1000 + i as u64), MAX_RECORD) {
                Parsed::Record(r, _) => {
                    let (len, fill) = values[i];
                    prop_assert_eq!(r.value, &vec![fill; len][..]);
                    prop_assert_eq!(r.key, b"k1");
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
        if flips.is_empty() && cut.is_none() {
            prop_assert_eq!(scan.records, written);
            prop_assert_eq!(scan.stop, Stop::End);
        }
    }
}
