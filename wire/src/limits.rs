//! Resource limits applied to every frame a peer sends.

/// Hard limits for decoding one frame.
///
/// Every limit is checked before the work it guards is done, so a hostile
/// peer can make the decoder spend at most `O(max_frame_len)` time and memory
/// on one frame. The defaults are the protocol's normative defaults; a broker
/// maps its config onto this struct.
///
/// Two rules are protocol, not configuration: a frame holds exactly one YAML
/// document (a leading `---` is fine), and any anchor or alias is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted frame body in bytes (the u32be length prefix not
    /// included). Checked from the prefix alone, before any byte of the body is
    /// buffered or parsed. Default: 65,536.
    pub max_frame_len: u32,
    /// Deepest accepted YAML nesting (mappings and sequences; the top-level
    /// mapping is depth 1). The deepest well-formed message needs 6. Default: 16.
    pub max_depth: usize,
    /// Longest accepted single scalar (key or value) in bytes after YAML
    /// unescaping. Default: 65,536.
    pub max_scalar_len: usize,
    /// Most YAML parser events accepted in one frame (stream, document,
    /// mapping/sequence start and end, scalars). Bounds the size of the decoded
    /// tree independently of byte length. Default: 4,096.
    pub max_events: usize,
}

/// Default for [`Limits::max_frame_len`].
pub const DEFAULT_MAX_FRAME_LEN: u32 = 65_536;
/// Default for [`Limits::max_depth`].
pub const DEFAULT_MAX_DEPTH: usize = 16;
/// Default for [`Limits::max_scalar_len`].
pub const DEFAULT_MAX_SCALAR_LEN: usize = 64 * 1024;
/// Default for [`Limits::max_events`].
pub const DEFAULT_MAX_EVENTS: usize = 4_096;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            max_depth: DEFAULT_MAX_DEPTH,
            max_scalar_len: DEFAULT_MAX_SCALAR_LEN,
            max_events: DEFAULT_MAX_EVENTS,
        }
    }
}
