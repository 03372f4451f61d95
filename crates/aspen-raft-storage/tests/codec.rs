//! Every type that goes to disk or over the wire round-trips through its codec.

mod common;

use std::collections::BTreeSet;

use aspen_api::{ApplyError, ValidationError, WriteResponse};
use aspen_raft_storage::{Entry, EntryResponse, StoredMembership, Vote};
use common::{Op, blank, log_id, normal};
use openraft::{EntryPayload, Membership};

fn round_trip<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = postcard::to_stdvec(value).expect("encode");
    let decoded: T = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(&decoded, value);
    if !bytes.is_empty() {
        // A truncated encoding never decodes to the same value (it may fail or differ).
        let truncated: Result<T, _> = postcard::from_bytes(&bytes[..bytes.len() - 1]);
        assert!(truncated.map_or(true, |other| &other != value));
    }
}

#[test]
fn entries_and_commands_round_trip() {
    bolero::check!().with_type::<(Op, u64, u64, Vec<u64>)>().for_each(|(op, term, index, voters)| {
        round_trip(&op.command());
        round_trip(&normal(*term, *index, op.command()));
        round_trip(&blank(*term, *index));
        let voters: BTreeSet<u64> = voters.iter().copied().take(8).collect();
        let membership = Membership::new_with_defaults(vec![voters], []);
        round_trip(&Entry { log_id: log_id(*term, *index), payload: EntryPayload::Membership(membership.clone()) });
        round_trip(&StoredMembership::new(Some(log_id(*term, *index)), membership));
        round_trip(&Vote::new_committed(*term, *index));
    });
}

#[test]
fn responses_round_trip() {
    bolero::check!().with_type::<(u64, u64, bool)>().for_each(|(revision, id, ok)| {
        let response = if *ok {
            EntryResponse::Writes(vec![Ok(WriteResponse::LeaseGrant { revision: *revision, id: *id, ttl_secs: 5 })])
        } else {
            EntryResponse::Writes(vec![Err(ApplyError::Invalid(ValidationError::KeyTooLarge {
                size: *id as usize,
                max: 1,
            }))])
        };
        round_trip(&response);
        round_trip(&EntryResponse::NoOp);
    });
}
