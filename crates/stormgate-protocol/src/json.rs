//! The few JSON writing helpers the record encoder needs.

/// Appends `s` as a JSON string literal, quotes included.
///
/// Station-supplied text (zipcode, city, metric names) is usually plain ASCII, so the common
/// case is one scan and one copy.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends a finite `f64` in the shortest form that reads back as the same value.
///
/// Integral values keep a `.0` (`60.0`), so every metric reads back as a float.
pub(crate) fn write_f64(out: &mut Vec<u8>, v: f64) {
    debug_assert!(v.is_finite());
    let mut buf = ryu::Buffer::new();
    out.extend_from_slice(buf.format_finite(v).as_bytes());
}

/// Appends an integer.
pub(crate) fn write_int(out: &mut Vec<u8>, v: impl itoa::Integer) {
    let mut buf = itoa::Buffer::new();
    out.extend_from_slice(buf.format(v).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_str(input: &str) {
        let mut out = Vec::new();
        write_str(&mut out, input);
        let back: String = serde_json::from_slice(&out).expect("valid JSON string");
        assert_eq!(back, input);
    }

    #[test]
    fn strings_round_trip() {
        for s in [
            "",
            "plain",
            "São Paulo",
            "q\"uote",
            "back\\slash",
            "nl\ncr\rtab\t",
            "\u{0}\u{1f}\u{7f}",
            "😀",
        ] {
            check_str(s);
        }
    }

    #[test]
    fn floats_are_shortest_round_trip() {
        let cases = [
            (25.5, "25.5"),
            (60.0, "60.0"),
            (-0.1, "-0.1"),
            (1e21, "1e21"),
            (1e-7, "1e-7"),
        ];
        for (v, expect) in cases {
            let mut out = Vec::new();
            write_f64(&mut out, v);
            assert_eq!(std::str::from_utf8(&out).unwrap(), expect);
            let back: f64 = serde_json::from_slice(&out).unwrap();
            assert_eq!(back, v);
        }
    }
}
