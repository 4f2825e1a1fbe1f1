//! Every bound the broker enforces, in one place.
//!
//! Each constant names its unit last (`_bytes`, `_seconds`, `_count`) and says what it costs. The
//! configurable ones are defaults: [`crate::config::Limits`] carries the values in force, and its
//! `validate` ties them to the hard ceilings here.

/// Largest frame (header + body) accepted on the wire. A batch of 16 messages of 64 KiB plus
/// headers fits; one frame of read buffer (2 MiB) per authenticated connection is the worst case a
/// client can make us hold (see [`HANDSHAKE_FRAME_BYTES_MAX`] before authentication).
pub const FRAME_BYTES_MAX: usize = 2 * 1024 * 1024;

/// Fixed frame header after the 4-byte length prefix: version, flags, opcode, request id.
pub const FRAME_HEADER_BYTES: usize = 8;

/// Longest queue, topic or subscription name (CMQ: 64 characters).
pub const NAME_BYTES_MAX: usize = 64;

/// Longest string field that is not a name or a message body (search words, error messages,
/// receipt handles, client names).
pub const STRING_BYTES_MAX: usize = 1024;

/// Messages per batch send, receive or delete (CMQ: 16).
pub const BATCH_COUNT_MAX: usize = 16;

/// Smallest and largest maxMsgSize a queue may be given (CMQ: 1 KiB - 64 KiB; TDMQ allows 1 MiB).
pub const MSG_BYTES_MIN_LIMIT: u32 = 1024;
/// See [`MSG_BYTES_MIN_LIMIT`].
pub const MSG_BYTES_MAX_LIMIT: u32 = 1024 * 1024;
/// Default maxMsgSize of a new queue.
pub const MSG_BYTES_DEFAULT: u32 = 65536;

/// Range and default of maxMsgHeapNum (cap on stored messages per queue).
pub const HEAP_COUNT_MIN: u64 = 1_000;
/// See [`HEAP_COUNT_MIN`].
pub const HEAP_COUNT_MAX: u64 = 1_000_000_000;
/// See [`HEAP_COUNT_MIN`].
pub const HEAP_COUNT_DEFAULT: u64 = 10_000_000;

/// Longest long-poll wait a request may ask for (CMQ: 30 s).
pub const POLL_WAIT_SECONDS_MAX: u32 = 30;

/// Range and default of a queue's visibilityTimeout (CMQ: 1 s - 12 h, default 30 s).
pub const VISIBILITY_SECONDS_MIN: u32 = 1;
/// See [`VISIBILITY_SECONDS_MIN`].
pub const VISIBILITY_SECONDS_MAX: u32 = 43_200;
/// See [`VISIBILITY_SECONDS_MIN`].
pub const VISIBILITY_SECONDS_DEFAULT: u32 = 30;

/// Range and default of msgRetentionSeconds (CMQ: 1 min - 15 days, default 4 days).
pub const RETENTION_SECONDS_MIN: u32 = 60;
/// See [`RETENTION_SECONDS_MIN`].
pub const RETENTION_SECONDS_MAX: u32 = 1_296_000;
/// See [`RETENTION_SECONDS_MIN`].
pub const RETENTION_SECONDS_DEFAULT: u32 = 345_600;

/// Longest rewind window (cmqd decision: 12 h, and never more than the retention).
pub const REWIND_SECONDS_MAX: u32 = 43_200;

/// Default longest delay of a message (CMQ: 1 h). Configurable up to [`DELAY_SECONDS_CEILING`].
pub const DELAY_SECONDS_DEFAULT_MAX: u32 = 3_600;
/// Hard ceiling on the configurable delay: 15 days, the longest retention.
pub const DELAY_SECONDS_CEILING: u32 = RETENTION_SECONDS_MAX;

/// Dead-letter policy 0: receives before a message is dead-lettered.
pub const MAX_RECEIVE_COUNT_MIN: u32 = 1;
/// See [`MAX_RECEIVE_COUNT_MIN`].
pub const MAX_RECEIVE_COUNT_MAX: u32 = 1_000;
/// Dead-letter policy 1: time to live before an unconsumed message is dead-lettered.
pub const TIME_TO_LIVE_SECONDS_MIN: u32 = 300;
/// See [`TIME_TO_LIVE_SECONDS_MIN`].
pub const TIME_TO_LIVE_SECONDS_MAX: u32 = 43_200;

/// Source queues one dead-letter queue may serve: queues whose dead-letter policy names it.
/// GetQueueAttributes lists them all in one reply (at most about 66 KiB of names at this cap);
/// a policy that would make one more is refused with 4000/10350 (cmqd decision: CMQ states no
/// cap).
pub const DEAD_LETTER_SOURCES_MAX: usize = 1_000;

/// Page size of ListQueue when the caller gives none, and the largest it may ask for.
pub const LIST_LIMIT_DEFAULT: u32 = 20;
/// See [`LIST_LIMIT_DEFAULT`].
pub const LIST_LIMIT_MAX: u32 = 1_000;

/// Bytes a BatchReceived or Peeked reply counts for each message besides its body (ids, times,
/// receipt handle, dead-letter info; about 170 at most), rounded up. With
/// [`REPLY_FRAME_RESERVE_BYTES`] it makes the reply-size rule of `spec/README.md`: messages are
/// taken while their bodies plus this much each stay within the frame limit minus the reserve.
pub const REPLY_MESSAGE_OVERHEAD_BYTES: usize = 256;
/// Bytes of the frame limit a BatchReceived or Peeked reply keeps for its header, status and
/// list count; see [`REPLY_MESSAGE_OVERHEAD_BYTES`].
pub const REPLY_FRAME_RESERVE_BYTES: usize = 4096;

/// Messages one PeekMessage may return.
pub const PEEK_COUNT_MAX: usize = 16;

/// Messages one redrive call moves back from a dead-letter queue.
pub const REDRIVE_COUNT_MAX: u32 = 10_000;

/// Default cap on queues per account (cmqd decision).
pub const QUEUES_PER_ACCOUNT_DEFAULT: usize = 10_000;

/// Default cap on open connections. An idle authenticated connection costs a few KiB (see
/// [`BUFFER_KEEP_BYTES`]; the README gives measured figures).
pub const CONNECTIONS_DEFAULT: usize = 10_000;

/// Default cap on open connections from one source address: as many as the global cap, since
/// on loopback (the default listener) every client shares one address. Lower it on a listener
/// that faces other machines.
pub const CONNECTIONS_PER_IP_DEFAULT: usize = CONNECTIONS_DEFAULT;

/// Default number of failed authentications one source address may make per minute before its
/// new connections are refused for the rest of that minute.
pub const AUTH_FAILURES_PER_IP_PER_MINUTE_DEFAULT: u32 = 10;

/// Default time one write to a client may take before the client is deemed stuck (it stopped
/// reading) and its connection is closed.
pub const WRITE_SECONDS_DEFAULT: u64 = 30;

/// Default cap on requests one connection may have in flight (pipelining depth).
pub const INFLIGHT_REQUESTS_PER_CONNECTION_DEFAULT: usize = 1_024;

/// Default cap on the bytes of request frames in flight (read, not yet answered) across all
/// binary-protocol connections: past it, connections stop reading until replies go out. The
/// per-connection count alone lets one connection hold 1,024 frames of up to 2 MiB.
pub const INFLIGHT_REQUEST_BYTES_DEFAULT: usize = 256 * 1024 * 1024;

/// The unit the request-bytes budget is counted in (a frame takes at least one).
pub const INFLIGHT_REQUEST_BYTES_UNIT: usize = 1024;

/// Default cap on long-poll waiters, per queue and in total.
pub const WAITERS_PER_QUEUE_DEFAULT: usize = 10_000;
/// See [`WAITERS_PER_QUEUE_DEFAULT`].
pub const WAITERS_TOTAL_DEFAULT: usize = 100_000;

/// Default time a new connection has to finish the handshake (TLS, Hello, Auth). Two round
/// trips take milliseconds; the deadline only bounds how long a silent or hostile peer holds a
/// handshake place ([`HANDSHAKES_DEFAULT`]).
pub const HANDSHAKE_SECONDS_DEFAULT: u64 = 5;

/// Largest frame (length field: header + body) a connection may send before it has
/// authenticated. Hello and Auth need at most [`HANDSHAKE_FRAME_BYTES_NEEDED`]; the full
/// [`FRAME_BYTES_MAX`] is allowed only after Auth, so an unauthenticated peer can make the broker
/// hold at most this much of read buffer (1,000 of them: 4 MiB, not 2 GiB). A longer frame
/// before Auth is a framing error: the connection is closed.
pub const HANDSHAKE_FRAME_BYTES_MAX: usize = 4 * 1024;

/// The longest Hello or Auth frame a valid client sends: header, then for Hello two version
/// bytes and a client name, for Auth a secretId and a 32-byte signature (strings carry a u16
/// length).
pub const HANDSHAKE_FRAME_BYTES_NEEDED: usize = FRAME_HEADER_BYTES + 2 + 2 + STRING_BYTES_MAX + 32;

/// Default cap on connections still in their handshake (accepted, not yet authenticated), in
/// total. Each holds at most [`HANDSHAKE_FRAME_BYTES_MAX`] of read buffer and a few tasks
/// (about 10 KiB), for at most the handshake deadline. More are refused at once.
pub const HANDSHAKES_DEFAULT: usize = 1_024;

/// Default cap on connections in their handshake from one source address. A client that opens
/// connections and never authenticates is held to this many, whatever the global cap.
pub const HANDSHAKES_PER_IP_DEFAULT: usize = 256;

// ---- The durable log ----

/// Default size of a log segment. Reclamation works in whole segments, so this is also about
/// the granularity of disk space given back; 64 MiB is 0.3 s of writing at 200 MB/s.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// Smallest segment accepted (tests use small ones to exercise rotation).
pub const SEGMENT_BYTES_MIN: u64 = 64 * 1024;

/// Largest segment accepted: record positions in a segment are 32-bit.
pub const SEGMENT_BYTES_MAX: u64 = 1024 * 1024 * 1024;

/// Default sync interval of `fsync = "interval"`, milliseconds.
pub const FSYNC_INTERVAL_MS_DEFAULT: u64 = 10;

const _: () = assert!(SEGMENT_BYTES_MIN <= SEGMENT_BYTES_DEFAULT);
const _: () = assert!(SEGMENT_BYTES_DEFAULT <= SEGMENT_BYTES_MAX);
const _: () = assert!(SEGMENT_BYTES_MAX <= u32::MAX as u64);

/// Bounds of the failed-authentication throttle (binary protocol).
pub mod auth {
    use std::time::Duration;

    /// How long failed authentications are counted before the count starts again.
    pub const THROTTLE_WINDOW: Duration = Duration::from_secs(60);

    /// Source addresses remembered at most; past it, addresses whose window is over are swept out.
    pub const THROTTLE_ADDRESSES_MAX: usize = 100_000;
}

/// Bounds of the CMQ HTTP API (`crate::http_api` re-exports them under the same names).
pub mod http {
    use std::time::Duration;

    /// Largest request body (CMQ: a whole request is at most 1 MB, else 4000/10420).
    pub const REQUEST_BODY_BYTES_MAX: usize = 1024 * 1024;

    /// Bodies of one BatchSendMessage or BatchPublishMessage sum to at most this (CMQ: 64 KiB;
    /// 4470/10300 past it).
    pub const BATCH_BODY_BYTES_MAX: usize = 64 * 1024;

    /// Longest request target (path and query string), bytes; past it the reply is 414 and the
    /// connection is closed. This is the longest URI the `http` crate represents (`u16::MAX - 1`),
    /// enforced by hyper, and so the most a GET can carry in its query: longer requests go as a
    /// POST body.
    pub const REQUEST_TARGET_BYTES_MAX: usize = 65_534;

    /// Longest request head: request line and header fields, line ends and the empty line that
    /// ends the head included, bytes; past it the reply is 431 and the connection is closed. Room
    /// for the longest request target and 16 KiB of header fields.
    pub const REQUEST_HEAD_BYTES_MAX: usize = 80 * 1024;

    /// Header fields of one request at most; more: 431 and the connection is closed.
    pub const REQUEST_HEADERS_MAX: usize = 100;

    const _: () = assert!(REQUEST_HEAD_BYTES_MAX >= REQUEST_TARGET_BYTES_MAX + 16 * 1024);

    /// A request whose head is longer than this gets its reply with `Connection: close`: hyper's
    /// read buffer had to grow past its initial 8 KiB to hold the head, and would keep that size
    /// (up to twice [`REQUEST_HEAD_BYTES_MAX`]) for as long as the connection stays open. The
    /// SDKs' POSTs have heads of a few hundred bytes; long GET queries pay a new connection.
    pub const KEPT_ALIVE_HEAD_BYTES_MAX: usize = 8 * 1024;

    /// Time a client has to send a request body once its headers are in.
    pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

    /// Parameters in one request at most. A batch of 16 bodies with 5 tags and the common
    /// parameters needs about 30; a request far past that is not a CMQ request.
    pub const PARAMS_MAX: usize = 128;

    /// Longest parameter name, bytes.
    pub const PARAM_NAME_BYTES_MAX: usize = 64;

    /// Longest `Nonce` accepted, bytes (the SDKs send a decimal number below 2^63).
    pub const NONCE_BYTES_MAX: usize = 64;
    /// Most bytes handed to hyper per read: one short of its initial read buffer (8 KiB), so that
    /// bodies never make the buffer grow ([`ReadChunks`]).
    pub const READ_CHUNK_BYTES: usize = 8 * 1024 - 1;

    /// How long shutdown waits for requests in progress (long polls end at once on shutdown).
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

    /// Digits of a list index at most (`msgBody.123456789`); more cannot be a contiguous index.
    pub const INDEX_DIGITS_MAX: usize = 9;
}

/// Client connections of the binary protocol: buffers, writes, shutdown, refusals.
pub mod connection {
    use std::time::Duration;

    /// Frames in a row with more behind them that make a connection busy. A client that sends two
    /// or three requests together now and then (a receive and a ping) keeps its small buffer; one
    /// that streams requests gets the large one.
    pub const PIPELINED_FRAMES_BUSY: u32 = 4;

    /// Frames shorter than this are copied together into one buffer; longer ones (big bodies) are
    /// written from their own allocation with vectored writes, saving a copy of every byte.
    pub const COPY_BELOW_BYTES: usize = 4096;

    /// Slices per vectored write (well under every system's IOV_MAX).
    pub const WRITE_SLICES_MAX: usize = 64;

    /// Bytes of a Delivery frame spent on each message besides its body (id, handle, times,
    /// dead-letter info), rounded up; used to cut deliveries to the frame limit.
    pub const DELIVERY_OVERHEAD_BYTES: usize = 256;

    /// Bodies at least this long are written from their own allocation rather than copied into the
    /// Delivery frame (the connection's writer sends the pieces with one vectored write).
    pub const DELIVERY_INLINE_BELOW_BYTES: usize = 4096;

    /// Room left in every frame for the header and list count.
    pub const FRAME_SLACK_BYTES: usize = 4096;

    /// How long shutdown waits for connections to finish their in-flight requests.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

    /// Most bytes read and thrown away from a refused connection after its error frame.
    pub const REFUSED_DRAIN_BYTES_MAX: usize = 64 * 1024;

    /// Longest a refused connection is kept open after its error frame, for the client to read it.
    pub const REFUSED_LINGER: Duration = Duration::from_secs(1);

    /// First pause after a failed accept; doubled on each failure in a row.
    pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(1);

    /// Longest pause after failed accepts.
    pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
}

/// The broker's own tasks: timers and log-line rate limits.
pub mod broker {
    use crate::clock::Millis;
    use std::time::Duration;

    /// How often the ticker advances timers of queues that nobody touches.
    pub const TICK_INTERVAL: Duration = Duration::from_millis(200);

    /// How often the storage budget is kept (bodies dropped from memory beyond the body
    /// cache; the disk budget checked): `broker::keeper`.
    pub const KEEPER_INTERVAL: Duration = Duration::from_millis(50);

    /// Longest the task sleeps without looking at the engine: the resolution of retry times
    /// (retries are at least a second apart) and how soon a manual clock's jump is noticed.
    pub const PUSH_TICK: Duration = Duration::from_millis(100);

    /// How long a long poll waits before looking again while the log refuses changes.
    pub const RETRY_WHILE_REFUSED_MS: Millis = 200;

    /// Length of a rate-limit window.
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// Lines a call site may log per window.
    pub const LINES_PER_WINDOW: u64 = 20;
}

/// The Prometheus recorder's own upkeep.
pub mod metrics {
    use std::time::Duration;

    /// How often the request-duration samples recorded since the last time are folded into
    /// their histograms. The recorder keeps every sample until then (8 bytes and more each), so
    /// without it a broker nobody scrapes grows by about 20 bytes per request, for ever.
    pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

    /// Name of the thread that does it.
    pub const UPKEEP_THREAD: &str = "cmqd-metrics";
}

/// The durable log's internal pacing and read sizes (its configurable sizes are above).
pub mod storage {
    use std::time::Duration;

    /// How often the writer tries to write again after a write failed.
    pub const RETRY_INTERVAL: Duration = Duration::from_millis(200);

    /// Messages are forgotten by the model this long after their retention ends, so that a
    /// concurrent call that saw the message a moment before it expired has long finished.
    pub const EXPIRY_SLACK_MS: u64 = 60_000;

    /// How often at most the writer records the synced position in the manifest (from its
    /// maintenance, never on a commit's path). Damage before the recorded position is told from a
    /// torn tail; a shorter interval narrows the part of the newest segment where a damaged last
    /// batch (flipped bits, no later batch after it) cannot be told from a torn write.
    pub const MANIFEST_INTERVAL: Duration = Duration::from_millis(250);

    /// Bytes a dead segment is cut by per removal step. Freeing a whole segment at once
    /// makes the file system's next journal commit discard all of it (`-o discard`), and every
    /// fsync waits behind that commit: unlinking four 64 MiB segments stalled a concurrent
    /// writer's fdatasync for 23-34 ms on the 2-core box, cutting them 4 MiB at a time kept it
    /// under 5 ms.
    pub const REMOVAL_STEP_BYTES: u64 = 4 * 1024 * 1024;

    /// Time between two removal steps while the removals pending are few, so that the discards
    /// are spread over many commits.
    pub const REMOVAL_STEP_INTERVAL: Duration = Duration::from_millis(5);

    /// Removal bytes pending beyond which steps are taken at every writer round, without
    /// waiting for [`REMOVAL_STEP_INTERVAL`]: dead segments must not pile up on disk faster
    /// than they go.
    pub const REMOVAL_HURRY_BYTES: u64 = 1024 * 1024 * 1024;

    /// Body bytes copied forward per compaction step, so that commits waiting behind a compaction
    /// wait at most a few milliseconds.
    pub const COMPACTION_STEP_BYTES: usize = 1024 * 1024;

    /// A segment is compacted only when the space its compaction frees (its dead bytes and segments
    /// only it keeps alive) is at least this many times the live bytes copied.
    pub const COMPACTION_GAIN_MIN: u64 = 2;

    /// Dead bytes the log may hold beyond its live bytes before compaction starts, in segments: the
    /// slack that keeps compaction from copying long-lived messages on every pass.
    pub const COMPACTION_SLACK_SEGMENTS: u64 = 2;

    /// Recovery reads segments through a window of this many bytes rather than whole: the window
    /// stays in the CPU caches between the read and the decoding (measured: reading and checking
    /// a log through a 256 KiB window takes about half the time of whole 64 MiB segments). A
    /// record larger than the window widens it for that record.
    pub const READ_WINDOW_BYTES: usize = 256 * 1024;

    /// With `fsync = "always"`, a commit batch of at least this many bytes is written around the
    /// page cache (`O_DIRECT`): its bytes go to the device without being copied into the
    /// cache, which it would have to write out before the fsync anyway. Copying 64 KiB bodies
    /// into the page cache took two thirds of the log writer's time (and the writer half the
    /// broker's) on the 2-core test machine, a VM where every page the cache takes is a fresh
    /// one. Small batches gain too: W1 (batches of about 45 KB) was about 10 % faster with
    /// every batch direct than with a 64 KiB threshold, W3's latency the same (same session,
    /// alternating builds). So every batch: 0.
    pub const DIRECT_WRITE_MIN_BYTES: u64 = 0;

    /// The log writer streams a batch to its segment through one buffer of this size (a
    /// multiple of the 4096-byte direct I/O block), kept for the writer's life: durable W5
    /// made batches of up to 85 MB, and a buffer as large allocated for each one cost a page
    /// fault and a page clear per 4 KiB (a sixth of the writer's time).
    pub const BATCH_CHUNK_BYTES: usize = 4 * 1024 * 1024;

    /// The log's inbox keeps the vector of a batch for the next one up to this many appends.
    pub const INBOX_KEEP_APPENDS: usize = 65_536;

    /// Bytes a read of a body dropped from memory fetches from its record on, so that draining
    /// a backlog reads the log in large sequential reads (`storage::log::bodies`).
    pub const READ_AHEAD_BYTES: usize = 1024 * 1024;

    /// Read-ahead windows kept (each up to [`READ_AHEAD_BYTES`], or one record when larger).
    pub const READ_AHEAD_WINDOWS: usize = 16;

    /// Bodies recovered are copied into chunks of this size, each body a slice of its chunk: one
    /// allocation per chunk rather than one per body. A chunk is freed once the last message in
    /// it is gone, so memory held stays within the bodies recovered (never the log's size).
    pub const BODY_CHUNK_BYTES: usize = 1024 * 1024;

    /// Bytes of log per chunk handed from recovery's reading thread to its replay.
    pub const READ_CHUNK_BYTES: usize = 256 * 1024;

    /// Chunks the reading thread may be ahead of the replay by.
    pub const READ_AHEAD_CHUNKS: usize = 4;

    /// Threads at most that read bodies in recovery's second pass.
    pub const BODY_READERS_MAX: usize = 4;

    /// Bodies per thread at least in recovery's second pass (fewer are read on one thread).
    pub const BODIES_PER_READER_MIN: usize = 64 * 1024;

    /// Segment ids a manifest may list (live and retired together): a bound for reading a damaged
    /// one, far above what a log holds (a 1 GiB segment each would be 4 PiB).
    pub const MANIFEST_SEGMENTS_MAX: usize = 1 << 22;
}

/// The client library.
pub mod client {
    /// Requests queued for writing at most; callers wait beyond it.
    pub const QUEUE_DEPTH: usize = 4096;
}

// ---- Connection buffers ----

/// Read buffer a connection starts with, and shrinks back to once quiet. Fits a Hello, an Auth,
/// and any request carrying a body under about 1.9 KiB, so a client that sends one request at a
/// time reads each with one `read`. Larger frames get a buffer of exactly their size.
pub const READ_BUFFER_IDLE_BYTES: usize = 2 * 1024;

/// Read buffer of a busy connection (one that sends frames back to back): one `read` takes
/// in up to this many bytes of pipelined requests.
pub const READ_BUFFER_BUSY_BYTES: usize = 64 * 1024;

/// Bytes the writer gathers from queued replies before one write. The gathering buffer starts
/// empty and grows with the load up to about this size (plus one frame).
pub const WRITE_COALESCE_BYTES: usize = 256 * 1024;

/// Buffer capacity a connection keeps while quiet, read or write side; anything above it is
/// given back after [`BUFFER_RELEASE_AFTER_MS`] without traffic.
pub const BUFFER_KEEP_BYTES: usize = 4 * 1024;

/// How long a connection must be quiet before its grown buffers are given back. Long enough
/// that a client sending bursts a few times a second keeps its buffers; short enough that a
/// crowd of clients that went idle (waiting in long polls) holds almost nothing.
pub const BUFFER_RELEASE_AFTER_MS: u64 = 2_000;

/// Default time an authenticated connection may stay silent (long polls in flight count as
/// activity) before it is closed.
pub const IDLE_SECONDS_DEFAULT: u64 = 300;

/// Default memory for stored message bodies, across all queues. Past it, sends fail with 6000
/// "broker memory limit reached" rather than growing without bound.
pub const BODY_MEMORY_BYTES_DEFAULT: u64 = 4 * 1024 * 1024 * 1024;

/// Default body cache of the log mode (`storage.body_cache_bytes`): bodies held in memory
/// beyond it are dropped (oldest first) and read back from the log when wanted, so a backlog
/// is bounded by disk, not by memory.
pub const BODY_CACHE_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;

/// Smallest body cache allowed.
pub const BODY_CACHE_BYTES_MIN: u64 = 1024 * 1024;

/// Default free space below which sends are refused (`storage.disk_free_min_bytes`), so that
/// deletes, compaction and a new segment still find room.
pub const DISK_FREE_MIN_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

// ---- Streaming consume ----

/// Largest credit (prefetch window) a Consume may ask for: the most messages one consumer may
/// hold delivered and not yet settled. The broker keeps about 50 bytes per held message (its id,
/// receive sequence and deadline); the client buffers at most this many messages.
pub const CONSUME_CREDIT_MAX: u32 = 4_096;

/// Most messages in one Delivery frame (Consume's `batch_max`). A frame is also cut short of the
/// frame limit, whatever the count.
pub const DELIVERY_MESSAGES_MAX: usize = 256;

/// Consumers one connection may run at once. Each is a task plus its window of held messages.
pub const CONSUMERS_PER_CONNECTION_MAX: usize = 32;

/// Bytes of Delivery frames one connection may have queued for its writer and not yet written.
/// A consumer whose client reads slowly waits here (back-pressure) instead of piling frames up
/// in memory; a client that stops reading altogether is closed by the write deadline.
pub const PUSH_UNWRITTEN_BYTES_PER_CONNECTION_MAX: usize = 8 * 1024 * 1024;

/// Longest a consumer sleeps without looking at its queue: it notices a deleted queue, and
/// deliveries whose visibility deadline passed, within this time even when nothing wakes it.
pub const CONSUMER_RECHECK_MS: u64 = 1_000;

// ---- Topics and subscriptions ----

/// Default cap on topics per account (cmqd decision).
pub const TOPICS_PER_ACCOUNT_DEFAULT: usize = 10_000;

/// Default cap on subscriptions per topic (cmqd decision; CMQ documents 100, 500 and 1,000).
pub const SUBSCRIPTIONS_PER_TOPIC_DEFAULT: usize = 1_000;

/// Range and default of a topic's maxMsgSize (CMQ: 1 KiB - 64 KiB, default 64 KiB).
pub const TOPIC_MSG_BYTES_MIN: u32 = 1024;
/// See [`TOPIC_MSG_BYTES_MIN`].
pub const TOPIC_MSG_BYTES_MAX: u32 = 65_536;
/// See [`TOPIC_MSG_BYTES_MIN`].
pub const TOPIC_MSG_BYTES_DEFAULT: u32 = 65_536;

/// How long a topic keeps a message that still waits for an HTTP delivery (CMQ v2: fixed at one
/// day). Past it the message is dropped for every subscription still waiting.
pub const TOPIC_RETENTION_SECONDS: u32 = 86_400;

/// Default cap on msgTag per message and filterTag per subscription (CMQ: 5 each).
pub const TAGS_PER_MESSAGE_DEFAULT_MAX: usize = 5;
/// See [`TAGS_PER_MESSAGE_DEFAULT_MAX`].
pub const TAGS_PER_SUBSCRIPTION_DEFAULT_MAX: usize = 5;
/// Default longest tag, in characters (CMQ: 16).
pub const TAG_CHARS_DEFAULT_MAX: usize = 16;

/// bindingKey per subscription (CMQ: 5).
pub const BINDING_KEYS_PER_SUBSCRIPTION_MAX: usize = 5;
/// Longest routingKey or bindingKey, bytes (CMQ: 64).
pub const ROUTING_KEY_BYTES_MAX: usize = 64;
/// Most `.` in a routingKey or bindingKey (CMQ: 15, so at most 16 words).
pub const ROUTING_KEY_DOTS_MAX: usize = 15;

/// Tags or binding keys one list may carry on the wire. Up to this the broker answers lists over
/// the configured maximum with CMQ's own codes (4000/10490, 10680, 10720); a longer list is a
/// malformed request. Bounds what a hostile frame can make the parser allocate.
pub const TAG_LIST_WIRE_MAX: usize = 16;

/// Longest HTTP endpoint URL (CMQ: 500 characters).
pub const ENDPOINT_BYTES_MAX: usize = 500;

/// Time one HTTP push may take before it counts as failed (CMQ: about 15 s).
pub const PUSH_TIMEOUT_SECONDS: u64 = 15;

/// HTTP pushes in flight for one subscription. Further due messages wait for a slot.
pub const PUSH_INFLIGHT_PER_SUBSCRIPTION_MAX: usize = 16;

/// HTTP pushes in flight to one endpoint host:port, whatever the subscriptions: a slow
/// endpoint holds at most this many connections and tasks of the broker.
pub const PUSH_INFLIGHT_PER_ENDPOINT_MAX: usize = 16;

/// HTTP pushes in flight in total. Each is a task and a connection for up to
/// [`PUSH_TIMEOUT_SECONDS`].
pub const PUSH_INFLIGHT_TOTAL_MAX: usize = 1_024;

/// Messages waiting for one HTTP subscription. Past it, new messages are dropped for that
/// subscription (and counted) rather than growing without bound while its endpoint is down.
pub const PUSH_BACKLOG_PER_SUBSCRIPTION_MAX: usize = 100_000;

/// EXPONENTIAL_DECAY_RETRY: the first retry interval, doubled after every failure up to
/// [`PUSH_RETRY_INTERVAL_SECONDS_MAX`] (CMQ: 1, 2, 4 ... 512 s, then 512 s).
pub const PUSH_RETRY_FIRST_SECONDS: u64 = 1;
/// See [`PUSH_RETRY_FIRST_SECONDS`].
pub const PUSH_RETRY_INTERVAL_SECONDS_MAX: u64 = 512;

/// BACKOFF_RETRY: retries after the first attempt, each after a random interval in
/// [`PUSH_BACKOFF_SECONDS_MIN`, `PUSH_BACKOFF_SECONDS_MAX`] (cmqd decision: 3, 10-20 s).
pub const PUSH_BACKOFF_RETRIES: u32 = 3;
/// See [`PUSH_BACKOFF_RETRIES`].
pub const PUSH_BACKOFF_SECONDS_MIN: u64 = 10;
/// See [`PUSH_BACKOFF_RETRIES`].
pub const PUSH_BACKOFF_SECONDS_MAX: u64 = 20;

const _: () = assert!(TOPIC_MSG_BYTES_DEFAULT >= TOPIC_MSG_BYTES_MIN);
const _: () = assert!(TOPIC_MSG_BYTES_DEFAULT <= TOPIC_MSG_BYTES_MAX);
const _: () = assert!(TOPIC_MSG_BYTES_MAX <= MSG_BYTES_MAX_LIMIT);
const _: () = assert!(TAGS_PER_MESSAGE_DEFAULT_MAX <= TAG_LIST_WIRE_MAX);
const _: () = assert!(TAGS_PER_SUBSCRIPTION_DEFAULT_MAX <= TAG_LIST_WIRE_MAX);
const _: () = assert!(BINDING_KEYS_PER_SUBSCRIPTION_MAX <= TAG_LIST_WIRE_MAX);
const _: () = assert!(ENDPOINT_BYTES_MAX <= STRING_BYTES_MAX);
const _: () = assert!(PUSH_BACKOFF_SECONDS_MIN <= PUSH_BACKOFF_SECONDS_MAX);
const _: () = assert!(PUSH_INFLIGHT_PER_SUBSCRIPTION_MAX <= PUSH_INFLIGHT_TOTAL_MAX);

const _: () = assert!(MSG_BYTES_DEFAULT >= MSG_BYTES_MIN_LIMIT);
const _: () = assert!(MSG_BYTES_DEFAULT <= MSG_BYTES_MAX_LIMIT);
// One maximal message must fit in a frame, with room for the header and fields around it.
const _: () = assert!((MSG_BYTES_MAX_LIMIT as usize) + 4096 <= FRAME_BYTES_MAX);
const _: () = assert!(REWIND_SECONDS_MAX <= RETENTION_SECONDS_MAX);
const _: () = assert!(VISIBILITY_SECONDS_DEFAULT <= VISIBILITY_SECONDS_MAX);
const _: () = assert!(HEAP_COUNT_DEFAULT >= HEAP_COUNT_MIN && HEAP_COUNT_DEFAULT <= HEAP_COUNT_MAX);
const _: () = assert!(PEEK_COUNT_MAX <= BATCH_COUNT_MAX);
const _: () = assert!(DELIVERY_MESSAGES_MAX <= u16::MAX as usize);
const _: () = assert!(CONSUME_CREDIT_MAX as usize >= DELIVERY_MESSAGES_MAX);
const _: () = assert!(PUSH_UNWRITTEN_BYTES_PER_CONNECTION_MAX >= FRAME_BYTES_MAX);
// Every valid Hello and Auth fits under the handshake cap, and the cap is a small buffer.
const _: () = assert!(HANDSHAKE_FRAME_BYTES_NEEDED <= HANDSHAKE_FRAME_BYTES_MAX);
const _: () = assert!(HANDSHAKE_FRAME_BYTES_MAX <= FRAME_BYTES_MAX);
const _: () = assert!(HANDSHAKES_PER_IP_DEFAULT <= HANDSHAKES_DEFAULT);
const _: () = assert!(READ_BUFFER_IDLE_BYTES <= BUFFER_KEEP_BYTES);
const _: () = assert!(BUFFER_KEEP_BYTES < READ_BUFFER_BUSY_BYTES);
const _: () = assert!(READ_BUFFER_BUSY_BYTES <= WRITE_COALESCE_BYTES);

/// Bounds of a replicated cluster (`[cluster]`) and its peer protocol.
pub mod cluster {
    /// Nodes a cluster may list.
    pub const NODES_MAX: usize = 9;
    /// Default leader heartbeat, ms. openraft 0.9 also makes it every Raft RPC's deadline (a
    /// client gives up at 3/4 of it): at 100 ms, appends of 64 KiB bodies timed out about 10
    /// times a second on the 2-core test box (3 local nodes, follower fsync included); at 250
    /// ms, 3 times in a whole W5 run. Elections are checked every 1.5 heartbeats, so a longer
    /// heartbeat delays a failover by up to that much.
    pub const HEARTBEAT_MS_DEFAULT: u64 = 250;
    /// Default lower bound of the election timeout, ms.
    pub const ELECTION_TIMEOUT_MIN_MS_DEFAULT: u64 = 1_000;
    /// Default upper bound of the election timeout, ms.
    pub const ELECTION_TIMEOUT_MAX_MS_DEFAULT: u64 = 2_000;
    /// Default number of entries after which a snapshot is built.
    pub const SNAPSHOT_AFTER_ENTRIES_DEFAULT: u64 = 20_000;

    use std::time::Duration;

    /// Bytes of entries one AppendEntries carries (at least one entry): larger batches are sent
    /// in parts, so that a catching-up follower writes and fsyncs one request well within the
    /// RPC deadline (3/4 of the heartbeat interval).
    pub const APPEND_BYTES_TARGET: usize = 8 * 1024 * 1024;
    /// Largest peer protocol frame (one Raft RPC or its response), bytes: a 64 MiB batch of
    /// entries plus room for its framing. A peer buffers at most this much per connection, so
    /// [`PEER_CONNECTIONS_MAX`] full frames cost 5 GiB at worst; only authenticated peers get
    /// past [`PEER_HANDSHAKE_FRAME_BYTES_MAX`].
    pub const PEER_FRAME_BYTES_MAX: usize = 80 * 1024 * 1024;
    /// Largest frame before a peer has authenticated (the challenge and the answer are 40-odd
    /// bytes): an unauthenticated connection buffers no more than this.
    pub const PEER_HANDSHAKE_FRAME_BYTES_MAX: usize = 256;
    /// Time a peer has to answer the challenge from the moment it connects.
    pub const PEER_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
    /// Longest wait for a peer's next request (or for it to take a response) before its
    /// connection is closed. Replication connections carry a heartbeat every 250 ms (default); an idle
    /// vote connection is closed by its client after the election anyway.
    pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// Peer connections a node serves at once: (nodes - 1) peers x (replication, snapshot,
    /// votes, leader checks) per group leaves ample room with one group.
    pub const PEER_CONNECTIONS_MAX: usize = 64;
    /// Peer connections a node serves at once from one IP address.
    pub const PEER_CONNECTIONS_PER_IP_MAX: usize = 32;
    /// First wait before an unreachable peer is tried again; doubled per failure.
    pub const PEER_BACKOFF_MIN: Duration = Duration::from_millis(50);
    /// Longest wait before an unreachable peer is tried again: a restarted node is caught up
    /// within about this long.
    pub const PEER_BACKOFF_MAX: Duration = Duration::from_secs(1);
    /// While a peer stays unreachable, at most one warning per this interval.
    pub const PEER_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(30);
    /// While a node may not vote (its damaged log is catching up), at most one line per this
    /// interval about the votes it refuses.
    pub const VOTE_REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
    /// Largest segment of a node's Raft log (`storage.segment_bytes` on a cluster node), bytes.
    /// Recovery reads a segment whole into memory, and a segment may outgrow this by a batch
    /// (and, after damage, by what was kept of the damaged segment): 1 GiB keeps that read
    /// under the 2 GiB recovery accepts of one file.
    pub const NODE_LOG_SEGMENT_BYTES_MAX: u64 = 1024 * 1024 * 1024;
    /// Record bytes of Raft log entries a node keeps in memory, all groups together: the
    /// newest written entries, oldest evicted first. Every other entry not yet purged is read
    /// back from the segment files when asked for, so the backlog openraft keeps until its
    /// next snapshot (up to [`SNAPSHOT_AFTER_ENTRIES_DEFAULT`] entries of up to a few MiB
    /// each) is bounded by disk, not RAM. 256 MiB holds a leader's whole proposal pipeline
    /// (32 entries of about 4 MiB in flight) twice, so the leader sending what it just
    /// appended and every node applying what was just committed read it from memory; a
    /// follower that far behind, or a restarted node, reads the files. (With 64 MiB, the
    /// leader of a 3-node cluster storing 64 KiB bodies read nearly every entry it sent back
    /// from disk: half its CPU.)
    pub const NODE_LOG_CACHE_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;
    /// Smallest `cluster.raft.log_cache_bytes`: a few of the largest AppendEntries.
    pub const NODE_LOG_CACHE_BYTES_MIN: u64 = 4 * APPEND_BYTES_TARGET as u64;
    /// Largest `cluster.raft.log_cache_bytes`.
    pub const NODE_LOG_CACHE_BYTES_MAX: u64 = 64 * 1024 * 1024 * 1024;

    // A 64 MiB entry batch fits with room for its framing; frame lengths are u32 on the wire.
    const _: () = assert!(64 * 1024 * 1024 + 1024 * 1024 <= PEER_FRAME_BYTES_MAX);
    const _: () = assert!(PEER_FRAME_BYTES_MAX <= u32::MAX as usize);
    const _: () = assert!(PEER_HANDSHAKE_FRAME_BYTES_MAX < PEER_FRAME_BYTES_MAX);
    const _: () = assert!(PEER_CONNECTIONS_PER_IP_MAX <= PEER_CONNECTIONS_MAX);
    const _: () = assert!(PEER_BACKOFF_MIN.as_millis() <= PEER_BACKOFF_MAX.as_millis());
    // Whatever `storage.segment_bytes` accepts, a cluster node's Raft log accepts too.
    const _: () = assert!(super::SEGMENT_BYTES_MAX <= NODE_LOG_SEGMENT_BYTES_MAX);
    // The cache holds at least a few of the largest entry batches a leader proposes.
    const _: () = assert!(NODE_LOG_CACHE_BYTES_DEFAULT >= 4 * APPEND_BYTES_TARGET as u64);

    /// Groups one ClusterStatus reply may list (each about 100 bytes on the wire plus 17 per
    /// member, so 1024 groups of 9 members stay under 300 KiB, well inside a frame).
    pub const STATUS_GROUPS_MAX: usize = 1024;
    /// Redirects (NotLeader answers naming a leader) a client follows for one request before
    /// it gives up: enough to cross a leader change or two, few enough that a cluster pointing
    /// in a circle fails a request fast. Answers that name no leader (an election) do not
    /// count: they are waited out with pauses until the request's deadline.
    pub const CLIENT_REDIRECTS_MAX: usize = 8;
    /// First pause, ms, before a client tries the next known node when the leader is unknown
    /// or a node cannot be reached; doubled per try up to [`CLIENT_BACKOFF_MS_MAX`], and
    /// never past the request's deadline.
    pub const CLIENT_BACKOFF_MS_MIN: u64 = 20;
    /// Longest such pause, ms: about a Raft election, so a client does not sleep through the
    /// new leader's first term.
    pub const CLIENT_BACKOFF_MS_MAX: u64 = 500;
    const _: () = assert!(CLIENT_BACKOFF_MS_MIN <= CLIENT_BACKOFF_MS_MAX);
    const _: () = assert!(STATUS_GROUPS_MAX <= u16::MAX as usize);
}
