//! Property: what a connection produces does not depend on how its byte stream was split into
//! reads. The driver below handles reads the way a shard's connection does: complete lines are
//! parsed in place in the read buffer, a partial line is carried in front of the next read,
//! and a final unterminated line counts when the stream ends.

use proptest::prelude::*;
use stormgate_protocol::{Frame, LineFramer, LineParser, PARSE_PADDING, Parsed, Session};

const MAX_LINE: usize = 200;

/// Every outcome, in order: `identified`, the record's key and value, or the error code.
fn run(chunks: &[&[u8]]) -> Vec<String> {
    let mut framer = LineFramer::new(MAX_LINE);
    let mut parser = LineParser::new();
    let mut session = Session::new("0190a0b0-0000-7000-8000-000000000000");
    let mut out = Vec::new();
    let mut outcomes = Vec::new();
    let mut carry: Vec<u8> = Vec::new();
    let last = [b"\n".as_slice()];
    for chunk in chunks.iter().chain(&last) {
        // The end of the stream completes a final unterminated line.
        let at_end = std::ptr::eq(*chunk, last[0]);
        if at_end && carry.is_empty() {
            break;
        }
        let mut buf = std::mem::take(&mut carry);
        buf.extend_from_slice(chunk);
        let end = buf.len();
        buf.resize(end + PARSE_PADDING, 0);
        let mut pos = 0;
        while let Some(frame) = framer.next_frame(&buf[..end], &mut pos) {
            let line = match frame {
                Frame::Line(line) => line,
                Frame::TooLong => {
                    outcomes.push("line_too_long".to_owned());
                    continue;
                }
            };
            outcomes.push(
                match parser.parse_line(&mut session, &mut buf, line, 42, &mut out) {
                    Ok(Parsed::Identified) => "identified".to_owned(),
                    Ok(Parsed::Record { .. }) => format!(
                        "{} {}",
                        session.station().unwrap().key(),
                        String::from_utf8_lossy(&out)
                    ),
                    Err(e) => e.code.as_str().to_owned(),
                },
            );
        }
        carry = buf[pos..end].to_vec();
    }
    outcomes
}

fn line() -> impl Strategy<Value = Vec<u8>> {
    let zip = "[0-9]{1,6}";
    let value = prop_oneof!["-?[0-9]{1,4}(\\.[0-9]{1,3})?", "[0-9]e[0-9]", "nan", "x"];
    prop_oneof![
        (zip, "[a-zA-Zé ]{0,12}").prop_map(|(z, c)| format!(
            r#"{{"type":"identify","zipcode":"{z}","city":"{c}"}}"#
        )
        .into_bytes()),
        proptest::collection::vec(("[a-z]{1,5}", value.clone()), 0..5).prop_map(|pairs| {
            let data: Vec<String> = pairs.iter().map(|(n, v)| format!("{n}={v}")).collect();
            format!(r#"{{"type":"metrics","data":"{}"}}"#, data.join(",")).into_bytes()
        }),
        ("[a-z]{1,5}", "-?[0-9]{1,3}").prop_map(|(n, v)| format!(
            r#"{{"type":"metrics","seq":7,"data":{{"{n}":{v}}}}}"#
        )
        .into_bytes()),
        Just(b"not json".to_vec()),
        Just(b"".to_vec()),
        Just(b"   ".to_vec()),
        Just(b"{\"type\":\"identify\",\"zipcode\":\"\xff\"}".to_vec()),
        Just(b"{\"type\":\"nope\"}".to_vec()),
        (MAX_LINE - 2..MAX_LINE + 300).prop_map(|n| vec![b'a'; n]),
    ]
}

fn stream() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec((line(), any::<bool>()), 0..40).prop_map(|lines| {
        let mut s = Vec::new();
        for (l, crlf) in lines {
            s.extend_from_slice(&l);
            s.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        }
        s
    })
}

/// `stream` and cut points, as positions into it.
fn split_stream() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    (stream(), any::<bool>()).prop_flat_map(|(s, truncate)| {
        // Sometimes drop the last byte so the final line has no newline.
        let s = if truncate && !s.is_empty() {
            s[..s.len() - 1].to_vec()
        } else {
            s
        };
        let len = s.len();
        (Just(s), proptest::collection::vec(0..=len, 0..30))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn outcomes_do_not_depend_on_read_boundaries((s, mut cuts) in split_stream()) {
        cuts.sort_unstable();
        cuts.dedup();
        let mut chunks: Vec<&[u8]> = Vec::new();
        let mut at = 0;
        for c in cuts {
            chunks.push(&s[at..c]);
            at = c;
        }
        chunks.push(&s[at..]);
        prop_assert_eq!(run(&chunks), run(&[&s]));
    }

    #[test]
    fn single_byte_reads_give_the_same_outcomes(s in stream()) {
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        prop_assert_eq!(run(&bytes), run(&[&s]));
    }
}
