//! docs/PROTOCOL.md is the contract stations are written against: every error code and its
//! exact message must be in its table, and the table must hold no code the server lacks.

use stormgate_protocol::ErrorCode;

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
