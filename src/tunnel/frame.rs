//! WebSocket frame *header* tracking (RFC 6455 §5.2).
//!
//! Owns the knowledge of where messages begin and end in one direction of a
//! tunnel. It reads headers only and skips payloads, so it costs a few
//! instructions per frame whatever the message size. It never rejects input:
//! the endpoints validate their peer; sluice only needs to stay in step with
//! the byte stream. Hand-written because it sits on the hot path and is small.

/// The longest frame header: 2 bytes, 8 bytes of extended length, 4 bytes of mask.
const MAX_HEADER: usize = 14;

/// Opcode of a Close frame.
pub const OPCODE_CLOSE: u8 = 0x8;
/// Opcode of a Ping frame.
pub const OPCODE_PING: u8 = 0x9;
/// Opcode of a Pong frame.
pub const OPCODE_PONG: u8 = 0xA;
/// Payload of sluice's own Ping frames: a random token.
pub const PING_TOKEN_LEN: usize = 8;

/// Tracks frame and message boundaries in one direction of a WebSocket stream.
#[derive(Debug, Default, Clone)]
pub struct FrameTracker {
    /// Header bytes of the frame being read, when a header spans reads.
    header: [u8; MAX_HEADER],
    /// How many bytes of `header` are filled.
    header_len: u8,
    /// Payload bytes left in the current frame.
    remaining: u64,
    /// A fragmented data message has started and its final frame has not.
    in_message: bool,
    /// A Close frame has been seen in this direction.
    close_seen: bool,
    /// Complete data messages seen.
    messages: u64,
    /// The status code of the first Close frame, as far as read (1005
    /// for a Close without one; 0 before any Close).
    close_code: u16,
    /// Bytes of that code still to read from the payload (0 to 2).
    code_left: u8,
    /// The Close frame's masking key (zero when unmasked).
    close_mask: [u8; 4],
}

impl FrameTracker {
    /// True between messages: no frame is partly read and no fragmented
    /// message is open. A Close frame may be injected here without cutting
    /// anything.
    pub fn is_at_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0 && !self.in_message
    }

    /// True between frames (possibly inside a fragmented message).
    pub fn is_at_frame_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0
    }

    /// True once a Close frame has started in this direction.
    pub fn close_seen(&self) -> bool {
        self.close_seen
    }

    /// Complete data messages seen so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// The status code of the first Close frame seen, once it has been
    /// read whole: 1005 when it carries none (RFC 6455 §7.1.5).
    pub fn close_code(&self) -> Option<u16> {
        (self.close_seen && self.code_left == 0).then_some(self.close_code)
    }

    /// Follows `data`, the next bytes of the stream.
    ///
    /// With `stop_at_boundary`, stops at the first message boundary (which
    /// may be at offset 0) and returns its offset: the bytes before it end a
    /// message, the bytes after it are not yet tracked. Otherwise, or when no
    /// boundary occurs in `data`, tracks all of `data` and returns `None`.
    pub fn scan(&mut self, data: &[u8], stop_at_boundary: bool) -> Option<usize> {
        let mut pos = 0;
        loop {
            if stop_at_boundary && self.is_at_boundary() {
                return Some(pos);
            }
            if pos == data.len() {
                return None;
            }
            pos += self.step(&data[pos..]);
        }
    }

    /// Follows `data` up to the start of the next Close frame and returns
    /// its offset (the Close frame itself is not tracked); `None` when
    /// `data` holds no Close frame start.
    pub fn scan_to_close(&mut self, data: &[u8]) -> Option<usize> {
        self.scan_to_control(data, OPCODE_CLOSE)
    }

    /// Follows `data` up to the start of the next control frame with
    /// `opcode` and returns its offset (that frame is not tracked); `None`
    /// when `data` holds no such frame start.
    pub fn scan_to_control(&mut self, data: &[u8], opcode: u8) -> Option<usize> {
        let mut pos = 0;
        loop {
            let at_frame_start = self.header_len == 0 && self.remaining == 0;
            if at_frame_start && pos < data.len() && data[pos] & 0x0f == opcode {
                return Some(pos);
            }
            if pos == data.len() {
                return None;
            }
            pos += self.step(&data[pos..]);
        }
    }

    /// Consumes payload bytes of the current frame, or header bytes of the
    /// next one, from non-empty `data`; returns how many.
    fn step(&mut self, data: &[u8]) -> usize {
        if self.remaining > 0 {
            if self.code_left > 0 {
                return self.read_close_code(data[0]);
            }
            let take = self.remaining.min(data.len() as u64);
            self.remaining -= take;
            return take as usize;
        }
        let filled = self.header_len as usize;
        let need = header_len(&self.header[..filled]);
        let take = (need - filled).min(data.len());
        self.header[filled..filled + take].copy_from_slice(&data[..take]);
        self.header_len += take as u8;
        let filled = self.header_len as usize;
        if filled == header_len(&self.header[..filled]) {
            self.complete_header();
        }
        take
    }

    /// Takes one byte of the first Close frame's status code (rare: once
    /// per tunnel, so a byte at a time).
    fn read_close_code(&mut self, byte: u8) -> usize {
        let index = 2 - self.code_left as usize;
        self.close_code = self.close_code << 8 | u16::from(byte ^ self.close_mask[index]);
        self.code_left -= 1;
        self.remaining -= 1;
        1
    }

    fn complete_header(&mut self) {
        let h = &self.header;
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        let len7 = h[1] & 0x7f;
        self.remaining = match len7 {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        };
        if opcode & 0x8 != 0 {
            // Control frames may sit inside a fragmented message and never
            // open or close one.
            if opcode == OPCODE_CLOSE && !self.close_seen {
                self.close_seen = true;
                self.close_code = 1005;
                if self.remaining >= 2 {
                    self.close_code = 0;
                    self.code_left = 2;
                    if h[1] & 0x80 != 0 {
                        let at = header_len(&h[..2]) - 4;
                        self.close_mask.copy_from_slice(&h[at..at + 4]);
                    }
                }
            }
        } else if fin {
            self.in_message = false;
            self.messages += 1;
        } else {
            self.in_message = true;
        }
        self.header_len = 0;
    }
}

/// Length of the header that starts with `prefix`, as far as `prefix` tells
/// (at least 2 bytes).
fn header_len(prefix: &[u8]) -> usize {
    if prefix.len() < 2 {
        return 2;
    }
    let mask = if prefix[1] & 0x80 != 0 { 4 } else { 0 };
    let ext = match prefix[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + mask
}

/// A Close frame with `code` and no reason, masked with `mask` when given
/// (frames towards a server must be masked). Returns the buffer and its length.
pub fn close_frame(code: u16, mask: Option<[u8; 4]>) -> ([u8; 8], usize) {
    let mut frame = [0u8; 8];
    frame[0] = 0x80 | OPCODE_CLOSE;
    let payload = code.to_be_bytes();
    match mask {
        None => {
            frame[1] = 2;
            frame[2..4].copy_from_slice(&payload);
            (frame, 4)
        }
        Some(key) => {
            frame[1] = 0x80 | 2;
            frame[2..6].copy_from_slice(&key);
            frame[6] = payload[0] ^ key[0];
            frame[7] = payload[1] ^ key[1];
            (frame, 8)
        }
    }
}

/// sluice's Ping to a client (unmasked, server to client) with `token`.
pub fn ping_frame(token: [u8; PING_TOKEN_LEN]) -> [u8; 2 + PING_TOKEN_LEN] {
    let mut frame = [0u8; 2 + PING_TOKEN_LEN];
    frame[0] = 0x80 | OPCODE_PING;
    frame[1] = PING_TOKEN_LEN as u8;
    frame[2..].copy_from_slice(&token);
    frame
}

/// Length of a client's Pong to sluice's Ping: 2 header bytes, the mask,
/// the token.
pub const OUR_PONG_LEN: usize = 2 + 4 + PING_TOKEN_LEN;

/// True when `data` starts with a whole, final, masked Pong carrying
/// `token`: the answer to sluice's own Ping.
pub fn is_our_pong(data: &[u8], token: &[u8; PING_TOKEN_LEN]) -> bool {
    if data.len() < OUR_PONG_LEN
        || data[0] != 0x80 | OPCODE_PONG
        || data[1] != 0x80 | PING_TOKEN_LEN as u8
    {
        return false;
    }
    let mask = &data[2..6];
    data[6..OUR_PONG_LEN]
        .iter()
        .enumerate()
        .all(|(i, b)| b ^ mask[i % 4] == token[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encodes one frame (test helper; real frames come from peers).
    fn frame(fin: bool, opcode: u8, payload_len: usize, masked: bool) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        if payload_len < 126 {
            out.push(mask_bit | payload_len as u8);
        } else if payload_len <= 0xffff {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(payload_len as u64).to_be_bytes());
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend(std::iter::repeat_n(0x5a, payload_len));
        out
    }

    #[test]
    fn single_text_frame_ends_at_boundary() {
        let mut t = FrameTracker::default();
        let f = frame(true, 1, 5, false);
        assert_eq!(t.scan(&f, false), None);
        assert!(t.is_at_boundary());
        assert_eq!(t.messages(), 1);
    }

    #[test]
    fn stop_reports_offset_after_each_message() {
        let mut data = frame(true, 1, 3, true);
        let first = data.len();
        data.extend(frame(true, 2, 300, true));
        let mut t = FrameTracker::default();
        assert_eq!(t.scan(&data, true), Some(0));
        assert_eq!(t.scan(&data[..first + 10], false), None);
        assert!(!t.is_at_boundary());
        let mut t = FrameTracker::default();
        // Skip the initial boundary by tracking one byte first.
        assert_eq!(t.scan(&data[..1], true), Some(0));
        assert_eq!(t.scan(&data[..1], false), None);
        assert_eq!(t.scan(&data[1..], true), Some(first - 1));
    }

    #[test]
    fn fragmented_message_with_ping_inside_is_one_message() {
        let mut data = frame(false, 1, 10, false);
        data.extend(frame(true, 0x9, 4, false)); // ping between fragments
        data.extend(frame(false, 0, 10, false));
        let before_last = data.len();
        data.extend(frame(true, 0, 10, false));
        let mut t = FrameTracker::default();
        t.scan(&data[..1], false);
        assert_eq!(t.scan(&data[1..], true), Some(data.len() - 1));
        assert_eq!(t.messages(), 1);
        let mut t = FrameTracker::default();
        t.scan(&data[..before_last], false);
        assert!(
            !t.is_at_boundary(),
            "ping inside a fragmented message is no boundary"
        );
    }

    #[test]
    fn sixty_four_bit_length_is_followed() {
        let mut t = FrameTracker::default();
        let header = &frame(true, 2, 70_000, false)[..10];
        t.scan(header, false);
        assert!(!t.is_at_boundary());
        t.scan(&vec![0; 69_999], false);
        assert!(!t.is_at_boundary());
        t.scan(&[0], false);
        assert!(t.is_at_boundary());
    }

    #[test]
    fn close_frame_is_seen() {
        let mut t = FrameTracker::default();
        let (f, n) = close_frame(1001, None);
        t.scan(&f[..n], false);
        assert!(t.close_seen());
        assert!(t.is_at_boundary());
    }

    #[test]
    fn close_codes_are_read_masked_or_not_and_across_reads() {
        for mask in [None, Some([0x37, 0xfa, 0x21, 0x3d])] {
            let (f, n) = close_frame(4000, mask);
            let mut data = frame(true, 1, 3, mask.is_some());
            let start = data.len();
            data.extend_from_slice(&f[..n]);
            for split in 0..=data.len() {
                let mut t = FrameTracker::default();
                t.scan(&data[..split], false);
                if split < start + n {
                    assert_eq!(t.close_code(), None, "{mask:?} at {split}");
                }
                t.scan(&data[split..], false);
                assert_eq!(t.close_code(), Some(4000), "{mask:?} at {split}");
            }
        }
        // A Close without a status code; a later Close does not count.
        let mut t = FrameTracker::default();
        t.scan(&[0x88, 0x00], false);
        let (f, n) = close_frame(1000, None);
        t.scan(&f[..n], false);
        assert_eq!(t.close_code(), Some(1005));
    }

    #[test]
    fn scan_to_close_stops_before_the_close_frame() {
        let mut data = frame(true, 1, 300, false);
        let close_at = data.len();
        let (close, n) = close_frame(1000, None);
        data.extend_from_slice(&close[..n]);
        for split in [1, 5, close_at, close_at + 1] {
            let mut t = FrameTracker::default();
            let first = t.scan_to_close(&data[..split]);
            let found = match first {
                Some(k) => k,
                None => split + t.scan_to_close(&data[split..]).expect("close frame found"),
            };
            assert_eq!(found, close_at, "split at {split}");
            assert!(!t.close_seen(), "the close frame itself is not tracked");
        }
        // A payload byte that looks like a Close opcode is not a frame start.
        let mut t = FrameTracker::default();
        assert_eq!(t.scan_to_close(&frame(true, 2, 3, false)[..3]), None);
        let looks_like_close = [0x82, 0x02, 0x88, 0x88];
        let mut t = FrameTracker::default();
        assert_eq!(t.scan_to_close(&looks_like_close), None);
    }

    #[test]
    fn our_pong_is_told_from_others() {
        let token = *b"sluice01";
        let mask = [9, 8, 7, 6];
        let mut pong = vec![0x8a, 0x88];
        pong.extend_from_slice(&mask);
        pong.extend(token.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        assert!(is_our_pong(&pong, &token));
        assert!(!is_our_pong(&pong[..OUR_PONG_LEN - 1], &token), "cut short");
        assert!(!is_our_pong(&pong, b"another!"), "another token");
        let mut ping = pong.clone();
        ping[0] = 0x89;
        assert!(!is_our_pong(&ping, &token), "a Ping");
        // Found where it starts, after a data frame.
        let mut stream = frame(true, 1, 3, true);
        let at = stream.len();
        stream.extend_from_slice(&pong);
        let mut t = FrameTracker::default();
        assert_eq!(t.scan_to_control(&stream, OPCODE_PONG), Some(at));
        assert_eq!(ping_frame(token)[..2], [0x89, 8]);
    }

    #[test]
    fn close_frame_bytes() {
        assert_eq!(
            close_frame(1012, None),
            ([0x88, 2, 0x03, 0xf4, 0, 0, 0, 0], 4)
        );
        let (masked, n) = close_frame(1012, Some([0xff, 0, 0, 0]));
        assert_eq!(
            &masked[..n],
            &[0x88, 0x82, 0xff, 0, 0, 0, 0x03 ^ 0xff, 0xf4]
        );
    }

    fn arb_frame() -> impl Strategy<Value = (bool, u8, usize, bool)> {
        (
            any::<bool>(),
            prop_oneof![Just(0u8), Just(1), Just(2), Just(8), Just(9), Just(10)],
            prop_oneof![0usize..126, 126usize..70_000],
            any::<bool>(),
        )
    }

    /// What the tracker shows after some prefix of the stream.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Seen {
        messages: u64,
        at_boundary: bool,
        at_frame_boundary: bool,
        close_seen: bool,
    }

    fn seen(t: &FrameTracker) -> Seen {
        Seen {
            messages: t.messages(),
            at_boundary: t.is_at_boundary(),
            at_frame_boundary: t.is_at_frame_boundary(),
            close_seen: t.close_seen(),
        }
    }

    /// RFC 6455 §5.2 read over the whole stream at once, written apart
    /// from the tracker: what it must show after each prefix `data[..i]`
    /// (index `i`, so `data.len() + 1` entries). A frame counts when its
    /// header is complete: a data frame (opcode 0-7) with FIN ends a
    /// message, without FIN opens one; a control frame (opcode 8-15) does
    /// neither and a Close (8) is seen. Nothing is rejected.
    fn expected_after_each_prefix(data: &[u8]) -> Vec<Seen> {
        let n = data.len();
        let mut out = Vec::with_capacity(n + 1);
        let mut now = Seen {
            messages: 0,
            at_boundary: true,
            at_frame_boundary: true,
            close_seen: false,
        };
        let mut in_message = false;
        out.push(now);
        let mut start = 0;
        while start < n {
            // Inside a header, until it is complete.
            now.at_frame_boundary = false;
            now.at_boundary = false;
            let header = match data.get(start + 1) {
                None => n + 1,
                Some(b) => {
                    let ext = match b & 0x7f {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    start + 2 + ext + if b & 0x80 != 0 { 4 } else { 0 }
                }
            };
            while out.len() < header.min(n + 1) {
                out.push(now);
            }
            if header > n {
                break;
            }
            let h = &data[start..header];
            let len: u64 = match h[1] & 0x7f {
                126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                127 => u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")),
                l => u64::from(l),
            };
            let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
            if opcode >= 8 {
                now.close_seen |= opcode == 8;
            } else if fin {
                in_message = false;
                now.messages += 1;
            } else {
                in_message = true;
            }
            // Inside the payload, until it ends.
            let end = header as u128 + u128::from(len);
            let set = |now: &mut Seen, i: usize| {
                now.at_frame_boundary = i as u128 == end;
                now.at_boundary = now.at_frame_boundary && !in_message;
            };
            for i in header..=n {
                if i as u128 > end {
                    break;
                }
                set(&mut now, i);
                out.push(now);
            }
            if end > n as u128 {
                break;
            }
            start = end as usize;
        }
        debug_assert_eq!(out.len(), n + 1);
        out
    }

    /// Bytes that look like frames often enough to reach every state: any
    /// first byte (FIN, reserved bits, every opcode), 7-, 16- and 64-bit
    /// lengths (small values in long encodings too), masked or not, short
    /// payloads, cut-off frames and garbage between them.
    fn frame_like_bytes() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            3 => (any::<u8>(), any::<bool>(), 0u64..40, 0u8..3, any::<bool>())
                .prop_map(|(first, masked, len, width, cut)| {
                    let m = if masked { 0x80 } else { 0 };
                    let mut out = vec![first];
                    match width {
                        0 => out.push(m | (len.min(125) as u8)),
                        1 => {
                            out.push(m | 126);
                            out.extend_from_slice(&(len as u16).to_be_bytes());
                        }
                        _ => {
                            out.push(m | 127);
                            out.extend_from_slice(&len.to_be_bytes());
                        }
                    }
                    if masked {
                        out.extend_from_slice(&[0x88, 0x08, 0x0f, 0x80]);
                    }
                    let len = if width == 0 { len.min(125) } else { len };
                    // Payload bytes that look like Close headers.
                    out.extend((0..len).map(|i| if i % 2 == 0 { 0x88 } else { 0x02 }));
                    if cut {
                        let keep = (first as usize) % out.len();
                        out.truncate(keep.max(1));
                    }
                    out
                }),
            1 => proptest::collection::vec(any::<u8>(), 0..8),
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
    }

    /// How one read is handed to the tracker.
    #[derive(Debug, Clone, Copy)]
    enum Feed {
        /// `scan(part, false)`.
        Track,
        /// `scan(part, true)`, stepping over each boundary by one byte.
        StopAtBoundaries,
        /// `scan_to_close(part)`, stepping over each Close start by one byte.
        ToClose,
    }

    fn feed() -> impl Strategy<Value = Feed> {
        prop_oneof![
            Just(Feed::Track),
            Just(Feed::StopAtBoundaries),
            Just(Feed::ToClose)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("SLUICE_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
            ..ProptestConfig::default()
        })]

        /// Any bytes (arbitrary, or frame-like with garbage and cut-off
        /// frames), split into reads of any size (empty ones too), each
        /// read handed over by `scan`, `scan(_, true)` or `scan_to_close`:
        /// after every call the tracker shows exactly what a reading of
        /// the whole stream shows after the same prefix, `scan(_, true)`
        /// stops at the first boundary at or after where it starts,
        /// `scan_to_close` at the first frame start whose opcode is Close,
        /// each having tracked exactly the bytes before it, and `None`
        /// only when there is none in the read (all of it then tracked).
        /// So nothing the tracker shows depends on how the stream was split.
        #[test]
        fn any_bytes_any_split_show_what_the_whole_stream_shows(
            data in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..2048),
                frame_like_bytes(),
            ],
            reads in proptest::collection::vec((0usize..300, feed()), 1..64),
        ) {
            let want = expected_after_each_prefix(&data);
            let close_at = |i: usize| want[i].at_frame_boundary && data[i] & 0x0f == OPCODE_CLOSE;
            let mut t = FrameTracker::default();
            let mut pos = 0;
            let mut read = reads.iter().cycle();
            // Ends once all of `data` is tracked (at least one more read
            // after that, an empty one, checks the end state).
            let mut done = false;
            let mut empty = 0;
            while !done {
                let (size, how) = *read.next().expect("cycle");
                // Empty reads too, but never only those.
                empty = if size == 0 { empty + 1 } else { 0 };
                let size = if empty > 2 { 1 } else { size };
                let end = (pos + size).min(data.len());
                done = pos == data.len();
                match how {
                    Feed::Track => {
                        prop_assert_eq!(t.scan(&data[pos..end], false), None);
                        pos = end;
                        prop_assert_eq!(seen(&t), want[pos], "tracked to {}", pos);
                    }
                    Feed::StopAtBoundaries => loop {
                        let next = (pos..=end).find(|&i| want[i].at_boundary);
                        let got = t.scan(&data[pos..end], true);
                        prop_assert_eq!(got, next.map(|i| i - pos), "scan(_, true) from {} to {}", pos, end);
                        pos = next.unwrap_or(end);
                        prop_assert_eq!(seen(&t), want[pos], "stopped at {}", pos);
                        if pos == end {
                            break;
                        }
                        prop_assert_eq!(t.scan(&data[pos..pos + 1], false), None);
                        pos += 1;
                        prop_assert_eq!(seen(&t), want[pos], "stepped to {}", pos);
                    },
                    Feed::ToClose => loop {
                        let next = (pos..end).find(|&i| close_at(i));
                        let got = t.scan_to_close(&data[pos..end]);
                        prop_assert_eq!(got, next.map(|i| i - pos), "scan_to_close from {} to {}", pos, end);
                        pos = next.unwrap_or(end);
                        prop_assert_eq!(seen(&t), want[pos], "stopped before a close at {}", pos);
                        if pos == end {
                            break;
                        }
                        prop_assert_eq!(t.scan(&data[pos..pos + 1], false), None);
                        pos += 1;
                        prop_assert_eq!(seen(&t), want[pos], "stepped to {}", pos);
                    },
                }
            }
            prop_assert_eq!(pos, data.len());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("SLUICE_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
            ..ProptestConfig::default()
        })]

        /// However a stream of frames is split into reads, the tracker
        /// reports the same boundaries: exactly after each final data frame.
        #[test]
        fn boundaries_do_not_depend_on_read_sizes(
            frames in proptest::collection::vec(arb_frame(), 1..12),
            cuts in proptest::collection::vec(1usize..5000, 1..40),
        ) {
            let mut data = Vec::new();
            let mut expected = Vec::new();
            let mut open = false;
            let mut messages = 0;
            for (fin, opcode, len, masked) in frames {
                // Control frames are never fragmented.
                let fin = fin || opcode >= 8;
                data.extend(frame(fin, opcode, len, masked));
                if opcode < 8 {
                    open = !fin;
                    if fin { messages += 1; }
                }
                if !open { expected.push(data.len()); }
            }
            let mut t = FrameTracker::default();
            let mut seen = Vec::new();
            let mut pos = 0;
            let mut cut = cuts.iter().cycle();
            while pos < data.len() {
                let end = (pos + cut.next().copied().unwrap_or(1)).min(data.len());
                let mut at = pos;
                while let Some(k) = t.scan(&data[at..end], true) {
                    let boundary = at + k;
                    if boundary > 0 {
                        seen.push(boundary);
                    }
                    if boundary == end {
                        break;
                    }
                    // Step over the boundary: track one byte without stopping.
                    t.scan(&data[boundary..boundary + 1], false);
                    at = boundary + 1;
                }
                pos = end;
            }
            seen.dedup();
            // A boundary at the end of a chunk is also found at the start of
            // the next one: compare the sets.
            expected.retain(|&b| b > 0);
            prop_assert_eq!(seen, expected);
            prop_assert_eq!(t.messages(), messages);
            prop_assert!(t.is_at_boundary() || open);
        }

        /// Any bytes at all, in any read sizes: the tracker never panics and
        /// every boundary it reports lies inside the chunk it was given.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096), chunk in 1usize..600) {
            let mut t = FrameTracker::default();
            for part in data.chunks(chunk) {
                let mut pos = 0;
                while let Some(k) = t.scan(&part[pos..], true) {
                    prop_assert!(pos + k <= part.len());
                    pos += k;
                    if pos == part.len() { break; }
                    t.scan(&part[pos..pos + 1], false);
                    pos += 1;
                }
            }
        }
    }
}
