//! Reading a topic back, and creating topics: for tests, benchmarks and the load generator.
//!
//! [`scan_topic`] streams a topic through a callback without keeping the records, so a
//! benchmark can check tens of millions of them; [`read_topic`] collects them, for tests.
//! Both assign every partition directly at its beginning (no consumer group, so no group-join
//! delay) and read each partition to its end: librdkafka reports the end when the fetch offset
//! reaches the high watermark the broker states. [`watermarks`] asks the broker (ListOffsets)
//! where each partition begins and ends, so a caller can check that what it read is exactly
//! what the broker holds: one record per offset from the first to the last.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// How long to wait for the topic's metadata before giving up: generous, since a broker that
/// has just started on two busy cores can take seconds to answer.
const METADATA_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest single wait inside librdkafka, so deadlines and ticks are checked this often.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// One record read from the topic.
#[derive(Debug, Clone)]
pub struct Consumed {
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// The record key.
    pub key: Option<Vec<u8>>,
    /// The record value.
    pub value: Option<Vec<u8>>,
    /// The record timestamp (producer create time), Unix milliseconds.
    pub timestamp_ms: Option<i64>,
}

/// One record as [`scan_topic`] sees it, borrowed from librdkafka's buffer.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// The record key.
    pub key: Option<&'a [u8]>,
    /// The record value.
    pub value: Option<&'a [u8]>,
    /// The record timestamp (producer create time), Unix milliseconds.
    pub timestamp_ms: Option<i64>,
}

impl RecordRef<'_> {
    /// An owned copy.
    pub fn to_owned(&self) -> Consumed {
        Consumed {
            partition: self.partition,
            offset: self.offset,
            key: self.key.map(<[u8]>::to_vec),
            value: self.value.map(<[u8]>::to_vec),
            timestamp_ms: self.timestamp_ms,
        }
    }
}

/// When [`scan_topic`] stops.
///
/// It always reads until every partition has reached its end. Then:
///
/// - without `expect` and without `follow`, it stops;
/// - with `expect`, it stops once at least that many records were read;
/// - with `follow`, it keeps waiting for new records until `expect` is reached (if given) or
///   `idle_timeout` passes without a new record.
///
/// `timeout` bounds the whole scan in every case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOptions {
    /// Records to wait for; `None` = whatever is there. Default `None`.
    pub expect: Option<u64>,
    /// Keep waiting for new records after the ends (see the type's doc). Default false.
    pub follow: bool,
    /// With `follow`, stop after this long without a new record. Default 10 s.
    pub idle_timeout: Duration,
    /// Upper bound on the whole scan. Default 300 s.
    pub timeout: Duration,
    /// How often the callback gets a [`ScanEvent::Tick`]; `None` = never. Default `None`.
    pub tick: Option<Duration>,
    /// Extra librdkafka consumer properties, applied last. Default none.
    pub properties: Vec<(String, String)>,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            expect: None,
            follow: false,
            idle_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(300),
            tick: None,
            properties: Vec::new(),
        }
    }
}

/// What [`scan_topic`] hands its callback.
#[derive(Debug, Clone, Copy)]
pub enum ScanEvent<'a> {
    /// A record, in partition order (no order across partitions).
    Record(RecordRef<'a>),
    /// [`ScanOptions::tick`] passed: where the scan is, for progress output.
    Tick(ScanProgress),
}

/// Where a scan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanProgress {
    /// Records read so far.
    pub records: u64,
    /// Partitions of the topic.
    pub partitions: usize,
    /// Partitions whose end has been reached (and nothing newer read since).
    pub partitions_at_end: usize,
    /// Time since the scan started (after the partitions were assigned).
    pub elapsed: Duration,
}

/// Why a scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every partition was at its end and the [`ScanOptions`] asked for nothing more.
    Complete,
    /// `follow`: no new record for `idle_timeout`.
    Idle,
    /// `timeout` passed first.
    Timeout,
}

/// The outcome of a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanStats {
    /// Records handed to the callback.
    pub records: u64,
    /// Partitions of the topic.
    pub partitions: usize,
    /// Time from the assignment to the stop.
    pub elapsed: Duration,
    /// Why it stopped.
    pub end: ScanEnd,
}

/// Creates `topic` with `partitions` partitions (replication 1); an existing topic is fine.
/// Returns once every partition answers a ListOffsets (at most 30 s).
pub fn create_topic(brokers: &str, topic: &str, partitions: i32) -> KafkaResult<()> {
    create_topic_with(brokers, topic, partitions, &[])
}

/// [`create_topic`] with extra librdkafka properties for the admin client (e.g. TLS).
pub fn create_topic_with(
    brokers: &str,
    topic: &str,
    partitions: i32,
    properties: &[(String, String)],
) -> KafkaResult<()> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (name, value) in properties {
        config.set(name, value);
    }
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = futures_lite::future::block_on(admin.create_topics([&new], &opts))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    // The controller answers once the topic is in its metadata; the broker loads the
    // partitions after that, and until it has, a ListOffsets to the leader is refused with
    // NOT_LEADER_OR_FOLLOWER (seen on a broker started seconds before). Wait until every
    // partition answers, so that the caller's first request finds the topic served.
    let deadline = Instant::now() + TOPIC_READY_TIMEOUT;
    loop {
        match watermarks(brokers, topic, properties) {
            // Every partition the metadata names answered.
            Ok(marks) if !marks.is_empty() => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(_) => {
                return Err(KafkaError::MetadataFetch(
                    RDKafkaErrorCode::UnknownTopicOrPartition,
                ));
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long [`create_topic`] waits for a new topic's partitions to be served.
const TOPIC_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads `topic` from the beginning of every partition until each partition has reached its
/// end and at least `expected` records were read, or `timeout` passes; returns what was read.
///
/// Partitions are assigned directly (no consumer group), so there is no group-join delay.
pub fn read_topic(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> KafkaResult<Vec<Consumed>> {
    let opts = ScanOptions {
        expect: Some(expected as u64),
        timeout,
        ..ScanOptions::default()
    };
    read_topic_with(brokers, topic, &opts)
}

/// [`read_topic`] with every [`ScanOptions`] (e.g. TLS or SASL properties).
pub fn read_topic_with(
    brokers: &str,
    topic: &str,
    opts: &ScanOptions,
) -> KafkaResult<Vec<Consumed>> {
    let mut out = Vec::with_capacity(opts.expect.unwrap_or(0) as usize);
    scan_topic(brokers, topic, opts, |event| {
        if let ScanEvent::Record(r) = event {
            out.push(r.to_owned());
        }
    })?;
    Ok(out)
}

/// Streams `topic` from the beginning of every partition through `on_event`, keeping nothing,
/// until `opts` says to stop (see [`ScanOptions`]).
///
/// Runs on the calling thread (librdkafka adds threads of its own); records are borrowed from
/// librdkafka's buffers for the duration of the callback.
pub fn scan_topic(
    brokers: &str,
    topic: &str,
    opts: &ScanOptions,
    mut on_event: impl FnMut(ScanEvent<'_>),
) -> KafkaResult<ScanStats> {
    let (consumer, partitions) = assign_from_beginning(brokers, topic, &opts.properties)?;
    let mut at_end: HashMap<i32, bool> = partitions.iter().map(|&p| (p, false)).collect();
    let mut ends = 0usize;
    let mut records = 0u64;
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let mut last_record = start;
    let mut next_tick = opts.tick.map(|t| start + t);
    let wants_more = |records: u64| opts.expect.is_some_and(|n| records < n);
    let end = loop {
        let now = Instant::now();
        if now >= deadline {
            break ScanEnd::Timeout;
        }
        if let Some(tick) = next_tick
            && now >= tick
        {
            on_event(ScanEvent::Tick(ScanProgress {
                records,
                partitions: partitions.len(),
                partitions_at_end: ends,
                elapsed: now - start,
            }));
            next_tick = opts.tick.map(|t| (tick + t).max(now));
        }
        if opts.follow && opts.expect.is_none_or(|n| records < n) {
            if now.duration_since(last_record) >= opts.idle_timeout {
                break ScanEnd::Idle;
            }
        } else if ends == partitions.len() && !wants_more(records) {
            break ScanEnd::Complete;
        }
        match consumer.poll(POLL_TIMEOUT.min(deadline - now)) {
            Some(Ok(m)) => {
                if at_end.insert(m.partition(), false) == Some(true) {
                    ends -= 1;
                }
                records += 1;
                last_record = Instant::now();
                on_event(ScanEvent::Record(RecordRef {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key(),
                    value: m.payload(),
                    timestamp_ms: m.timestamp().to_millis(),
                }));
            }
            Some(Err(KafkaError::PartitionEOF(p))) if at_end.insert(p, true) == Some(false) => {
                ends += 1;
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => return Err(e),
            None => {}
        }
    };
    Ok(ScanStats {
        records,
        partitions: partitions.len(),
        elapsed: start.elapsed(),
        end,
    })
}

/// Each partition's (low, high) watermarks: its first offset and the offset after its last
/// record, as the broker's ListOffsets states them. Without transactions or compaction, a
/// partition holds exactly `high - low` records, one per offset.
pub fn watermarks(
    brokers: &str,
    topic: &str,
    properties: &[(String, String)],
) -> KafkaResult<BTreeMap<i32, (i64, i64)>> {
    let (consumer, partitions) = assign_from_beginning(brokers, topic, properties)?;
    partitions
        .into_iter()
        .map(|p| Ok((p, consumer.fetch_watermarks(topic, p, METADATA_TIMEOUT)?)))
        .collect()
}

/// What is wrong with `records` read from a topic whose partitions span `watermarks`: per
/// partition, an offset read twice, an offset missing between the watermarks, or a record
/// outside them. Empty when the read was exactly the broker's content.
pub fn offset_errors<'a>(
    records: impl IntoIterator<Item = (i32, i64)> + 'a,
    watermarks: &BTreeMap<i32, (i64, i64)>,
) -> Vec<String> {
    let mut read: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for (partition, offset) in records {
        read.entry(partition).or_default().push(offset);
    }
    let mut errors = Vec::new();
    for (&partition, &(low, high)) in watermarks {
        let mut offsets = read.remove(&partition).unwrap_or_default();
        offsets.sort_unstable();
        let n = offsets.len();
        offsets.dedup();
        if offsets.len() != n {
            errors.push(format!(
                "partition {partition}: {} offsets read more than once",
                n - offsets.len()
            ));
        }
        let inside = offsets
            .iter()
            .filter(|&&o| (low..high).contains(&o))
            .count();
        if inside as i64 != high - low {
            errors.push(format!(
                "partition {partition}: {inside} of the {} records between offsets {low} and \
                 {high} read",
                high - low
            ));
        }
        if inside != offsets.len() {
            errors.push(format!(
                "partition {partition}: {} records read outside offsets {low}..{high}",
                offsets.len() - inside
            ));
        }
    }
    for (partition, offsets) in read {
        errors.push(format!(
            "partition {partition}: {} records read from a partition the topic does not have",
            offsets.len()
        ));
    }
    errors
}

/// The first error librdkafka reports to a client with `properties` that connects to
/// `brokers` (its error callback: e.g. "SASL authentication error"), waiting at most
/// `timeout`; `None` if there was none by then. For tests proving that a broker refuses a
/// client, which librdkafka otherwise only logs while it retries.
pub fn first_client_error(
    brokers: &str,
    properties: &[(String, String)],
    timeout: Duration,
) -> KafkaResult<Option<String>> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        config.set(k, v);
    }
    let producer: BaseProducer<ErrorLog> = config.create_with_context(ErrorLog::default())?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        producer.poll(POLL_TIMEOUT);
        if let Some(first) = producer.context().0.lock().expect("error log").first() {
            return Ok(Some(first.clone()));
        }
    }
    Ok(None)
}

/// Collects librdkafka's error callbacks, for [`first_client_error`].
#[derive(Default)]
struct ErrorLog(Mutex<Vec<String>>);

impl ClientContext for ErrorLog {
    fn error(&self, error: KafkaError, reason: &str) {
        self.0
            .lock()
            .expect("error log")
            .push(format!("{error}: {reason}"));
    }
}

impl ProducerContext for ErrorLog {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// A consumer with every partition of `topic` assigned at its beginning, and those partitions.
fn assign_from_beginning(
    brokers: &str,
    topic: &str,
    properties: &[(String, String)],
) -> KafkaResult<(BaseConsumer, Vec<i32>)> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("stormgate-verify-{}", uuid::Uuid::now_v7()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        // A fetch returns as soon as there is a record, or after this long: a follower sees
        // new records within ~10 ms instead of librdkafka's default 500 ms, which matters
        // when it measures end-to-end latency.
        .set("fetch.wait.max.ms", "10")
        // librdkafka 2.x waits this long before fetching again once its local queue is past
        // `queued.min.messages`; the default 1 s stalls a fast reader (170K records/s from a
        // local broker, against 1.2M/s with 10 ms).
        .set("fetch.queue.backoff.ms", "10");
    for (k, v) in properties {
        config.set(k, v);
    }
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(KafkaError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
    }
    let mut assignment = TopicPartitionList::new();
    for &p in &partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok((consumer, partitions))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmbeddedCluster;
    use rdkafka::producer::BaseRecord;

    const TOPIC: &str = "verify.scan";

    fn produce(brokers: &str, n: usize) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .unwrap();
        for i in 0..n {
            let key = format!("k{}", i % 7);
            let value = format!("v{i}");
            producer
                .send(BaseRecord::to(TOPIC).key(&key).payload(&value))
                .unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }

    #[test]
    fn scan_streams_every_record_and_stops_at_the_ends() {
        let cluster = EmbeddedCluster::start(TOPIC, 3).unwrap();
        let brokers = cluster.bootstrap_servers();
        produce(&brokers, 500);
        let mut values = Vec::new();
        let mut per_partition = [0u64; 3];
        let stats = scan_topic(&brokers, TOPIC, &ScanOptions::default(), |e| {
            if let ScanEvent::Record(r) = e {
                per_partition[r.partition as usize] += 1;
                values.push(String::from_utf8(r.value.unwrap().to_vec()).unwrap());
            }
        })
        .unwrap();
        assert_eq!(stats.records, 500);
        assert_eq!(stats.partitions, 3);
        assert_eq!(stats.end, ScanEnd::Complete);
        assert_eq!(per_partition.iter().sum::<u64>(), 500);
        values.sort_by_key(|v| v[1..].parse::<u32>().unwrap());
        assert_eq!(values.first().map(String::as_str), Some("v0"));
        assert_eq!(values.last().map(String::as_str), Some("v499"));

        // The same topic read by the collecting variant.
        assert_eq!(
            read_topic(&brokers, TOPIC, 500, Duration::from_secs(30))
                .unwrap()
                .len(),
            500
        );
    }

    #[test]
    fn follow_stops_after_the_idle_timeout_and_expect_times_out() {
        let cluster = EmbeddedCluster::start(TOPIC, 2).unwrap();
        let brokers = cluster.bootstrap_servers();
        produce(&brokers, 10);
        let follow = ScanOptions {
            follow: true,
            idle_timeout: Duration::from_millis(500),
            tick: Some(Duration::from_millis(100)),
            ..ScanOptions::default()
        };
        let mut ticks = 0;
        let stats = scan_topic(&brokers, TOPIC, &follow, |e| {
            if let ScanEvent::Tick(p) = e {
                assert!(p.records <= 10);
                ticks += 1;
            }
        })
        .unwrap();
        assert_eq!((stats.records, stats.end), (10, ScanEnd::Idle));
        assert!(ticks >= 3, "{ticks} ticks");

        let too_many = ScanOptions {
            expect: Some(11),
            timeout: Duration::from_millis(800),
            ..ScanOptions::default()
        };
        let stats = scan_topic(&brokers, TOPIC, &too_many, |_| {}).unwrap();
        assert_eq!((stats.records, stats.end), (10, ScanEnd::Timeout));

        let enough = ScanOptions {
            expect: Some(10),
            follow: true,
            ..ScanOptions::default()
        };
        let stats = scan_topic(&brokers, TOPIC, &enough, |_| {}).unwrap();
        assert_eq!((stats.records, stats.end), (10, ScanEnd::Complete));
    }

    #[test]
    fn offset_errors_name_duplicates_gaps_and_strays() {
        let marks: BTreeMap<i32, (i64, i64)> = [(0, (0, 3)), (1, (2, 4))].into();
        let check = |read: &[(i32, i64)]| offset_errors(read.iter().copied(), &marks);
        assert!(check(&[(0, 0), (0, 1), (0, 2), (1, 2), (1, 3)]).is_empty());
        assert_eq!(
            check(&[(0, 0), (0, 2), (1, 2), (1, 3)]),
            ["partition 0: 2 of the 3 records between offsets 0 and 3 read"]
        );
        assert_eq!(
            check(&[(0, 0), (0, 1), (0, 1), (0, 2), (1, 2), (1, 3)]),
            ["partition 0: 1 offsets read more than once"]
        );
        assert_eq!(
            check(&[(0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (1, 4), (2, 0)]),
            [
                "partition 1: 1 records read outside offsets 2..4",
                "partition 2: 1 records read from a partition the topic does not have"
            ]
        );
    }

    #[test]
    fn watermarks_match_what_a_scan_reads() {
        let cluster = EmbeddedCluster::start(TOPIC, 3).unwrap();
        let brokers = cluster.bootstrap_servers();
        produce(&brokers, 300);
        let records = read_topic(&brokers, TOPIC, 300, Duration::from_secs(30)).unwrap();
        let marks = watermarks(&brokers, TOPIC, &[]).unwrap();
        assert_eq!(marks.len(), 3);
        assert_eq!(marks.values().map(|(l, h)| h - l).sum::<i64>(), 300);
        let read = records.iter().map(|r| (r.partition, r.offset));
        assert_eq!(offset_errors(read, &marks), Vec::<String>::new());
    }

    #[test]
    fn a_missing_topic_is_an_error() {
        let cluster = EmbeddedCluster::start(TOPIC, 1).unwrap();
        let err = scan_topic(
            &cluster.bootstrap_servers(),
            "no.such.topic",
            &ScanOptions::default(),
            |_| {},
        );
        assert!(err.is_err());
    }
}
