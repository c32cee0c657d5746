//! docs/PROTOCOL.md is the contract stations are written against: every error code and its
//! exact message must be in its table, and the table must hold no code the server lacks; the
//! same for nack codes, and the answers it spells out are the lines the server writes.

use stormgate_protocol::{ErrorCode, NackCode, Reply};

fn protocol_doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md");
    std::fs::read_to_string(path).expect("docs/PROTOCOL.md")
}

#[test]
fn every_error_code_is_documented_with_its_message() {
    let doc = protocol_doc();
    for code in ErrorCode::ALL {
        let row = format!("| `{}` | {} |", code.as_str(), code.message());
        assert!(doc.contains(&row), "docs/PROTOCOL.md lacks the row {row}");
    }
}

#[test]
fn the_error_table_documents_no_unknown_code() {
    let doc = protocol_doc();
    let table = doc
        .split("| Code | Message | When |")
        .nth(1)
        .expect("error table");
    for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let code = row.split('`').nth(1).expect("code cell");
        assert!(
            ErrorCode::ALL.iter().any(|c| c.as_str() == code),
            "docs/PROTOCOL.md documents unknown code {code}"
        );
    }
}

#[test]
fn the_documented_error_line_is_the_one_sent() {
    let doc = protocol_doc();
    let line = ErrorCode::MalformedJson.error_line();
    assert!(
        doc.contains(line.trim_end()),
        "example error line drifted: {line}"
    );
}

/// The rows of the table whose header is `header`: its lines after the separator.
fn table_rows<'a>(doc: &'a str, header: &str) -> Vec<&'a str> {
    let table = doc.split(header).nth(1).expect(header);
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect()
}

#[test]
fn the_nack_table_documents_exactly_the_nack_codes() {
    let doc = protocol_doc();
    let documented: Vec<&str> = table_rows(&doc, "| Nack code | When | The line is |")
        .into_iter()
        .map(|row| row.split('`').nth(1).expect("code cell"))
        .collect();
    let codes: Vec<&str> = NackCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(documented, codes, "docs/PROTOCOL.md's nack codes");
}

/// The answers the doc spells out with `N` for the seq are the server's lines.
#[test]
fn the_documented_answers_are_the_ones_sent() {
    let doc = protocol_doc();
    let replies = [
        Reply::Ack { seq: 7 },
        Reply::AckUpto { upto: 7 },
        Reply::Nack {
            seq: 7,
            code: NackCode::DeliveryFailed,
        },
        Reply::Nack {
            seq: 7,
            code: NackCode::BufferFull,
        },
        Reply::Reconnect,
    ];
    for reply in replies {
        let mut line = Vec::new();
        reply.encode(&mut line);
        let line = String::from_utf8(line).unwrap().replace('7', "N");
        assert!(
            doc.contains(line.trim_end()),
            "docs/PROTOCOL.md lacks the answer {line}"
        );
    }
}
