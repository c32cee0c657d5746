//! Station lines as the tests send them. Lines written with `format!` put their arguments in
//! unescaped: zipcodes, tokens and data without quotes or backslashes.

use std::ops::Range;

/// An identify asking for acknowledgements, city `Town`, with `token` when given.
pub fn identify(zipcode: &str, token: Option<&str>) -> Vec<u8> {
    let mut v =
        serde_json::json!({"type": "identify", "zipcode": zipcode, "city": "Town", "acks": true});
    if let Some(token) = token {
        v["token"] = token.into();
    }
    format!("{v}\n").into_bytes()
}

/// An identify with neither acknowledgements nor a city, with `token` when given.
pub fn identify_without_acks(zipcode: &str, token: Option<&str>) -> Vec<u8> {
    let token = token.map_or_else(String::new, |t| format!(",\"token\":\"{t}\""));
    format!("{{\"type\":\"identify\",\"zipcode\":\"{zipcode}\"{token}}}\n").into_bytes()
}

/// A metrics line with `seq`.
pub fn metrics(seq: u64, data: &str) -> Vec<u8> {
    format!(
        "{}\n",
        serde_json::json!({"type": "metrics", "seq": seq, "data": data})
    )
    .into_bytes()
}

/// A metrics line for each seq of `seqs`, its data `data(seq)`.
pub fn seq_lines(seqs: Range<u64>, data: impl Fn(u64) -> String) -> String {
    seqs.map(|n| {
        let data = data(n);
        format!("{{\"type\":\"metrics\",\"seq\":{n},\"data\":\"{data}\"}}\n")
    })
    .collect()
}

/// Lines `from..from + n` of station number `station`: each carries its running `seq`, and
/// data `t=STATION.SEQ`, so a record read back says whose line it was.
pub fn station_lines(station: usize, from: u64, n: u64) -> String {
    seq_lines(from..from + n, |i| format!("t={station}.{i}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_as_sent_before() {
        assert_eq!(
            station_lines(3, 7, 2),
            "{\"type\":\"metrics\",\"seq\":7,\"data\":\"t=3.7\"}\n\
             {\"type\":\"metrics\",\"seq\":8,\"data\":\"t=3.8\"}\n"
        );
        assert_eq!(
            identify_without_acks("12345", Some("good")),
            b"{\"type\":\"identify\",\"zipcode\":\"12345\",\"token\":\"good\"}\n"
        );
        assert_eq!(
            identify_without_acks("12345", None),
            b"{\"type\":\"identify\",\"zipcode\":\"12345\"}\n"
        );
        let id: serde_json::Value = serde_json::from_slice(&identify("1", Some("t"))).unwrap();
        assert_eq!(
            id,
            serde_json::json!({"type": "identify", "zipcode": "1", "city": "Town", "acks": true, "token": "t"})
        );
        assert_eq!(
            metrics(4, "x=1"),
            b"{\"data\":\"x=1\",\"seq\":4,\"type\":\"metrics\"}\n"
        );
    }
}
