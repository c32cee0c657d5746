//! `produce`: the plain-producer ceiling.
//!
//! The records are built once, before the clock starts, by running station lines through the
//! server's own parser (`stormgate_protocol::LineParser`), so their values are byte for byte
//! what the server would publish for one station per key. Then
//! [`stormgate_kafka::ceiling::produce_prebuilt`] publishes them round-robin with the server's
//! producer settings.

use std::process::ExitCode;

use serde::Serialize;
use stormgate_kafka::ceiling::produce_prebuilt;
use stormgate_kafka::verify::create_topic;
use stormgate_protocol::{LineParser, Session};

use crate::cli::ProduceArgs;
use crate::lines::{self, MetricsLines};
use crate::{LoadgenError, output};

/// Runs `produce`; the exit code is failure when any record was not delivered.
pub fn run(args: &ProduceArgs) -> Result<ExitCode, LoadgenError> {
    if args.keys == 0 {
        return Err(LoadgenError::Usage("--keys must be at least 1".into()));
    }
    let settings = args.kafka_settings();
    if let Some(partitions) = args.create_topic {
        create_topic(&settings.brokers, &settings.topic, partitions)
            .map_err(|e| LoadgenError::kafka("create the topic", e))?;
    }
    let records = build_records(args.keys, args.zip_base, lines::unix_micros());
    let value_bytes =
        records.iter().map(|(_, v)| v.len()).sum::<usize>() as f64 / records.len() as f64;
    eprintln!(
        "stormgate-loadgen produce: {} records ({} keys, {value_bytes:.0}-byte values) to {} on {}; compression {}, acks {}, linger {} ms, batch {}",
        args.records,
        args.keys,
        settings.topic,
        settings.brokers,
        settings.compression,
        settings.acks,
        settings.batch_timeout.as_millis(),
        settings.batch_size,
    );
    let report = produce_prebuilt(&settings, &records, args.records)
        .map_err(|e| LoadgenError::kafka("produce", e))?;
    let summary = ProduceSummary {
        mode: "produce".into(),
        records: report.records,
        delivered: report.delivered,
        warmup_records: report.warmup,
        failed: report.failed,
        duration_s: report.duration.as_secs_f64(),
        records_per_s: report.records_per_s(),
        keys: args.keys as u64,
        value_bytes_avg: value_bytes,
        compression: settings.compression.to_string(),
        acks: settings.acks.to_string(),
        batch_size: settings.batch_size,
        batch_timeout_ms: settings.batch_timeout.as_millis() as u64,
        idempotence: settings.idempotence,
        first_error: report.first_error,
    };
    output::emit(&summary, args.summary.as_deref())?;
    Ok(if summary.delivered == summary.records {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The JSON summary of a produce run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProduceSummary {
    /// Always `"produce"`.
    pub mode: String,
    /// Records handed to the producer.
    pub records: u64,
    /// Records acknowledged.
    pub delivered: u64,
    /// Records sent before timing started (a warm-up so the producer id wait is not timed);
    /// they are in the topic in addition to `delivered`.
    pub warmup_records: u64,
    /// Records not delivered.
    pub failed: u64,
    /// First send to the end of the flush.
    pub duration_s: f64,
    /// Delivered records per second.
    pub records_per_s: f64,
    /// Distinct keys.
    pub keys: u64,
    /// Mean value size in bytes.
    pub value_bytes_avg: f64,
    /// `compression.codec`.
    pub compression: String,
    /// `acks`.
    pub acks: String,
    /// `batch.num.messages`.
    pub batch_size: u32,
    /// `linger.ms`.
    pub batch_timeout_ms: u64,
    /// `enable.idempotence`.
    pub idempotence: bool,
    /// The first delivery error, if any.
    pub first_error: Option<String>,
}

/// One (key, value) per key: what the server publishes for station `zip_base + i`'s metrics
/// line (without seq, with `sent_us`), read at `now_us`.
pub fn build_records(keys: usize, zip_base: u64, now_us: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let template = MetricsLines::new(false, true);
    let mut parser = LineParser::new();
    let received_at_ms = (now_us / 1000) as i64;
    (0..keys)
        .map(|i| {
            let zipcode = lines::zipcode(zip_base, i);
            let mut session = Session::new(&uuid::Uuid::now_v7().to_string());
            let mut value = Vec::new();
            let mut identify = lines::identify_line(&zipcode, lines::CITY, false);
            let mut metrics = Vec::new();
            template.push(&mut metrics, i as u64, now_us);
            for line in [&mut identify, &mut metrics] {
                let len = line.len() - 1;
                parser
                    .parse_line(&mut session, line, 0..len, received_at_ms, &mut value)
                    .expect("the load generator's own lines are valid");
            }
            (zipcode.into_bytes(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_the_servers_shape() {
        let now_us = 1_795_750_241_813_123;
        let records = build_records(3, 10_040, now_us);
        assert_eq!(records.len(), 3);
        let mut ids = std::collections::HashSet::new();
        for (i, (key, value)) in records.iter().enumerate() {
            let zip = format!("{}", 10_040 + i);
            assert_eq!(key, zip.as_bytes());
            let text = std::str::from_utf8(value).unwrap();
            assert!(
                text.starts_with(r#"{"connection_id":""#),
                "fields in the server's order: {text}"
            );
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            let obj = v.as_object().unwrap();
            let fields: Vec<&str> = obj.keys().map(String::as_str).collect();
            assert_eq!(
                fields,
                [
                    "city",
                    "connection_id",
                    "metrics",
                    "received_at_ms",
                    "zipcode"
                ]
            );
            assert_eq!(v["zipcode"], zip.as_str());
            assert_eq!(v["city"], "Bench City");
            assert_eq!(v["received_at_ms"], 1_795_750_241_813_i64);
            assert_eq!(v["metrics"]["sent_us"].as_f64(), Some(now_us as f64));
            assert!(text.contains(r#""sent_us":1795750241813123.0"#), "{text}");
            let id = uuid::Uuid::parse_str(v["connection_id"].as_str().unwrap()).unwrap();
            assert_eq!(id.get_version_num(), 7);
            assert!(ids.insert(id));
            assert!((150..260).contains(&value.len()), "{} bytes", value.len());
        }
    }
}
