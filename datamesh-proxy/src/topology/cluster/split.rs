//! Multi-key commands across slots: MGET/MSET/DEL/UNLINK/EXISTS/TOUCH are split into one
//! part per slot ([`split_multikey`]) and the parts' replies merged back into the one reply
//! Redis would give ([`merge`]). Other multi-key commands must keep their keys in one slot
//! (else `-CROSSSLOT`, see [`super::slots::common_slot`]).

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};

use super::slots::key_slot;
use crate::commands::MultiKey;
use crate::resp::{array_elements, encode_command};

/// One per-slot part of a split multi-key command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubCommand {
    pub slot: u16,
    /// The full command: name first, then this slot's keys (and values for MSET).
    pub args: Vec<Bytes>,
    /// For each key of this part, its index among the original command's keys (MSET: pair
    /// index). [`merge`] puts MGET values back in that order.
    pub positions: Vec<usize>,
}

impl SubCommand {
    /// The RESP2 array encoding of `args`, ready to write to a backend.
    pub fn encode(&self) -> Bytes {
        encode_command(&self.args)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// Answer to the client as `-ERR wrong number of arguments for '<name>' command`.
    #[error("wrong number of arguments for '{name}' command")]
    WrongArity { name: &'static str },
}

/// Arguments per key (MSET: key and value).
fn step(kind: MultiKey) -> usize {
    if kind == MultiKey::Mset {
        2
    } else {
        1
    }
}

/// Splits the multi-key command `name` (a table name: "mget", "del", ...) into one
/// [`SubCommand`] per slot, in order of first appearance. `args` are the arguments after the
/// command name. When the result has one element, every key is in one slot: forward the
/// client's original bytes instead. Otherwise send every part to its slot's node (following
/// redirects per part as for any command) and give the replies, in part order, to [`merge`].
pub fn split_multikey(
    name: &'static str,
    kind: MultiKey,
    args: &[Bytes],
) -> Result<Vec<SubCommand>, SplitError> {
    let step = step(kind);
    if args.is_empty() || !args.len().is_multiple_of(step) {
        return Err(SplitError::WrongArity { name });
    }
    let upper = Bytes::from(name.to_ascii_uppercase());
    let mut parts: Vec<SubCommand> = Vec::new();
    let mut by_slot: HashMap<u16, usize> = HashMap::new();
    for (pos, chunk) in args.chunks(step).enumerate() {
        let slot = key_slot(&chunk[0]);
        let i = *by_slot.entry(slot).or_insert_with(|| {
            parts.push(SubCommand {
                slot,
                args: vec![upper.clone()],
                positions: Vec::new(),
            });
            parts.len() - 1
        });
        let part = &mut parts[i];
        part.args.extend(chunk.iter().cloned());
        part.positions.push(pos);
    }
    Ok(parts)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("{kind:?}: {subs} parts but {replies} replies")]
    Count {
        kind: MultiKey,
        subs: usize,
        replies: usize,
    },
    #[error("{kind:?}: part {part} answered an unexpected reply: {what}")]
    Unexpected {
        kind: MultiKey,
        part: usize,
        what: String,
    },
}

/// Merges the raw replies (complete RESP frames) of the parts from [`split_multikey`] into
/// the one reply the client gets:
/// - MGET: one array with the values in the original key order (element bytes copied as
///   the backends sent them, RESP2 or RESP3);
/// - MSET: `+OK` when every part said OK, else the first part's error;
/// - DEL/UNLINK/EXISTS/TOUCH: the sum of the integers.
///
/// Any part's error reply (after redirects were followed) becomes the whole reply, as Redis
/// would fail the command. A malformed part is a [`MergeError`] (answer `-ERR` with it).
pub fn merge(kind: MultiKey, subs: &[SubCommand], replies: &[Bytes]) -> Result<Bytes, MergeError> {
    if subs.len() != replies.len() {
        return Err(MergeError::Count {
            kind,
            subs: subs.len(),
            replies: replies.len(),
        });
    }
    if let Some(err) = replies
        .iter()
        .find(|r| r.first() == Some(&b'-') || r.first() == Some(&b'!'))
    {
        return Ok(err.clone());
    }
    let unexpected = |part: usize, what: &str| MergeError::Unexpected {
        kind,
        part,
        what: what.to_string(),
    };
    match kind {
        MultiKey::Mget => {
            let total: usize = subs.iter().map(|s| s.positions.len()).sum();
            let mut slots: Vec<Option<Bytes>> = vec![None; total];
            for (i, (sub, raw)) in subs.iter().zip(replies).enumerate() {
                let elems = array_elements(raw).ok_or_else(|| unexpected(i, "not an array"))?;
                if elems.len() != sub.positions.len() {
                    return Err(unexpected(
                        i,
                        &format!("{} values for {} keys", elems.len(), sub.positions.len()),
                    ));
                }
                for (&pos, e) in sub.positions.iter().zip(elems) {
                    let slot = slots
                        .get_mut(pos)
                        .ok_or_else(|| unexpected(i, "key position out of range"))?;
                    *slot = Some(e);
                }
            }
            let mut out = BytesMut::new();
            crate::resp::put_header(&mut out, b'*', total as i64);
            for (pos, v) in slots.into_iter().enumerate() {
                let v = v.ok_or_else(|| unexpected(0, &format!("no value for key {pos}")))?;
                out.put_slice(&v);
            }
            Ok(out.freeze())
        }
        MultiKey::Mset => {
            for (i, r) in replies.iter().enumerate() {
                if r.as_ref() != b"+OK\r\n" {
                    return Err(unexpected(i, &String::from_utf8_lossy(r)));
                }
            }
            Ok(Bytes::from_static(b"+OK\r\n"))
        }
        MultiKey::Sum => {
            let mut sum: i64 = 0;
            for (i, r) in replies.iter().enumerate() {
                let n = r
                    .strip_prefix(b":")
                    .and_then(|r| r.strip_suffix(b"\r\n"))
                    .and_then(|n| std::str::from_utf8(n).ok())
                    .and_then(|n| n.parse::<i64>().ok())
                    .ok_or_else(|| unexpected(i, "not an integer"))?;
                sum = sum.saturating_add(n);
            }
            let mut out = BytesMut::new();
            crate::resp::put_header(&mut out, b':', sum);
            Ok(out.freeze())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::bytes;

    #[test]
    fn split_groups_keys_by_slot_in_order() {
        let args: Vec<Bytes> = ["{a}1", "foo", "{a}2", "bar", "{a}3"]
            .into_iter()
            .map(bytes)
            .collect();
        let parts = split_multikey("mget", MultiKey::Mget, &args).expect("split");
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].slot, key_slot(b"a"));
        assert_eq!(
            parts[0].args,
            vec![bytes("MGET"), bytes("{a}1"), bytes("{a}2"), bytes("{a}3")]
        );
        assert_eq!(parts[0].positions, vec![0, 2, 4]);
        assert_eq!(parts[1].positions, vec![1]);
        assert_eq!(parts[2].args, vec![bytes("MGET"), bytes("bar")]);
        assert_eq!(
            parts[2].encode().as_ref(),
            b"*2\r\n$4\r\nMGET\r\n$3\r\nbar\r\n"
        );

        let mset: Vec<Bytes> = ["foo", "1", "bar", "2", "{foo}x", "3"]
            .into_iter()
            .map(bytes)
            .collect();
        let parts = split_multikey("mset", MultiKey::Mset, &mset).expect("split");
        assert_eq!(parts.len(), 2);
        assert_eq!(
            parts[0].args,
            vec![
                bytes("MSET"),
                bytes("foo"),
                bytes("1"),
                bytes("{foo}x"),
                bytes("3")
            ]
        );
        assert_eq!(parts[0].positions, vec![0, 2]);

        assert_eq!(
            split_multikey("mset", MultiKey::Mset, &mset[..3]),
            Err(SplitError::WrongArity { name: "mset" })
        );
        assert_eq!(
            split_multikey("del", MultiKey::Sum, &[]),
            Err(SplitError::WrongArity { name: "del" })
        );
        for n in ["del", "unlink", "exists", "touch"] {
            let parts = split_multikey(n, MultiKey::Sum, &args).expect("split");
            assert_eq!(parts.len(), 3);
            assert_eq!(parts[0].args[0], bytes(&n.to_ascii_uppercase()));
        }
    }

    #[test]
    fn merge_reassembles_and_sums() {
        let args: Vec<Bytes> = ["{a}1", "foo", "{a}2", "bar"]
            .into_iter()
            .map(bytes)
            .collect();
        let parts = split_multikey("mget", MultiKey::Mget, &args).expect("split");
        let replies = vec![
            bytes("*2\r\n$2\r\nA1\r\n$-1\r\n"),
            bytes("*1\r\n$3\r\nFOO\r\n"),
            bytes("*1\r\n_\r\n"),
        ];
        let merged = merge(MultiKey::Mget, &parts, &replies).expect("merge");
        assert_eq!(
            merged.as_ref(),
            b"*4\r\n$2\r\nA1\r\n$3\r\nFOO\r\n$-1\r\n_\r\n"
        );
        // Errors win, wrong shapes are MergeErrors.
        let with_err = vec![
            replies[0].clone(),
            bytes("-MOVED 1 1.2.3.4:5\r\n"),
            replies[2].clone(),
        ];
        assert_eq!(
            merge(MultiKey::Mget, &parts, &with_err)
                .expect("merge")
                .as_ref(),
            b"-MOVED 1 1.2.3.4:5\r\n"
        );
        assert!(merge(MultiKey::Mget, &parts, &replies[..2]).is_err());
        let short = vec![
            bytes("*1\r\n$2\r\nA1\r\n"),
            replies[1].clone(),
            replies[2].clone(),
        ];
        assert!(merge(MultiKey::Mget, &parts, &short).is_err());

        let ok = vec![bytes("+OK\r\n"); 3];
        assert_eq!(
            merge(MultiKey::Mset, &parts, &ok).expect("merge").as_ref(),
            b"+OK\r\n"
        );
        let mixed = vec![
            bytes("+OK\r\n"),
            bytes("-OOM no\r\n"),
            bytes("-ERR later\r\n"),
        ];
        assert_eq!(
            merge(MultiKey::Mset, &parts, &mixed)
                .expect("merge")
                .as_ref(),
            b"-OOM no\r\n"
        );

        let ints = vec![bytes(":2\r\n"), bytes(":0\r\n"), bytes(":1\r\n")];
        assert_eq!(
            merge(MultiKey::Sum, &parts, &ints).expect("merge").as_ref(),
            b":3\r\n"
        );
        assert!(merge(
            MultiKey::Sum,
            &parts,
            &[bytes(":1\r\n"), bytes("+OK\r\n"), bytes(":1\r\n")]
        )
        .is_err());
    }
}
