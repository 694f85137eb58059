//! Groups: a name and a member list that live only on the members' devices.
//!
//! # Why pairwise fan-out and not Megolm
//!
//! A group message is sent to each member as a separate message, encrypted with the
//! pairwise Olm sessions the members already have (one ciphertext per device, as for a
//! contact), each under a message id of its own. The alternative, Megolm sender keys
//! (`vodozemac::megolm`), encrypts once for everybody but needs a key-sharing message to
//! every device before the first message and a new session after every removal (else the
//! removed member reads on), and its receipts are per message, not per member. For the
//! groups people use a messenger like this for — families, teams, up to
//! [`MAX_GROUP_MEMBERS`] people — fan-out costs a few more ciphertexts per message and
//! buys: removal takes effect with the next message, every member's ✓/✓✓ is known, an
//! offline member gets everything from the server's queue like any message, and the
//! server sees ordinary messages between users and nothing of the group (no group id,
//! no member list).
//!
//! # Membership
//!
//! Every group message carries the sender's view of the group ([`GroupContext`]: id,
//! epoch, name, members). A change (created, added, removed, left) is a message with no
//! text whose context has the new list and the next epoch. A device adopts a context
//! whose epoch is higher than its own (two changes made at once with the same epoch: the
//! list whose digest sorts higher wins on every device, so they agree). Only a member,
//! as this device knows the group, can speak or change it; a change adding someone is
//! sent to the members already there before the new ones, so by the time a new member can
//! write, everyone's queue holds the change that made them a member.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use postern_protocol::schema::{group_change, GroupChange, GroupContext};
use postern_protocol::username;
use sha2::{Digest, Sha256};

use crate::ClientError;

/// Most members a group may have (this account included): each message is encrypted and
/// sent once per member.
pub const MAX_GROUP_MEMBERS: usize = 100;
/// Longest group name, in bytes.
pub const MAX_GROUP_NAME_BYTES: usize = 100;
/// The conversation key prefix of a group (usernames cannot contain ':').
const KEY_PREFIX: &str = "group:";

/// A group's id: 16 random bytes chosen by its creator, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub [u8; 16]);

impl GroupId {
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The key its conversation is stored and addressed under: `group:` and the hex id.
    /// [`crate::Client::queue`], `history` and `mark_read` take it where they take a
    /// contact's name.
    pub fn conversation_key(&self) -> String {
        format!("{KEY_PREFIX}{self}")
    }

    /// The group a conversation key names, if it names one.
    pub fn from_conversation_key(key: &str) -> Option<Self> {
        key.strip_prefix(KEY_PREFIX)?.parse().ok()
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(Self(b.try_into().ok()?))
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupId({self})")
    }
}

impl FromStr for GroupId {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<Self, ClientError> {
        hex::decode(s)
            .ok()
            .and_then(|b| Self::from_bytes(&b))
            .ok_or_else(|| ClientError::InvalidInput(format!("{s:?} is not a group id")))
    }
}

impl serde::Serialize for GroupId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A group as this device knows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupInfo {
    pub id: GroupId,
    pub name: String,
    pub epoch: u64,
    /// Usernames, sorted; this account among them while it is a member.
    pub members: Vec<String>,
    /// Whether this account is still a member (false once it left or was removed; the
    /// conversation is kept).
    pub joined: bool,
    pub created_ms: u64,
}

impl GroupInfo {
    pub fn conversation_key(&self) -> String {
        self.id.conversation_key()
    }

    pub fn has(&self, user: &str) -> bool {
        self.members.iter().any(|m| m == user)
    }

    /// The members other than `me`: who a message goes to.
    pub fn others(&self, me: &str) -> Vec<String> {
        self.members.iter().filter(|m| *m != me).cloned().collect()
    }

    /// The context a message sent to the group now carries.
    pub fn context(&self, change: Option<GroupChange>) -> GroupContext {
        GroupContext {
            group_id: self.id.0.to_vec(),
            epoch: self.epoch,
            name: self.name.clone(),
            members: self.members.clone(),
            change,
        }
    }

    /// What a context describes, as a group to store.
    fn from_context(ctx: &GroupContext, me: &str, created_ms: u64) -> Option<Self> {
        let mut members = ctx.members.clone();
        members.sort();
        members.dedup();
        Some(Self {
            id: GroupId::from_bytes(&ctx.group_id)?,
            name: ctx.name.clone(),
            epoch: ctx.epoch,
            joined: members.iter().any(|m| m == me),
            members,
            created_ms,
        })
    }

    /// A stable digest of the membership, to order two contexts with the same epoch.
    fn digest(name: &str, members: &[String]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(name.as_bytes());
        for m in members {
            h.update([0]);
            h.update(m.as_bytes());
        }
        h.finalize().into()
    }
}

/// A membership change made here: the group as it is now, and the message telling the
/// others (None when nobody is left to tell). Like any message, it is saved first and goes
/// out with the next send.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MembershipChange {
    pub group: GroupInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<crate::MessageId>,
}

/// Checks a group name typed by the user.
pub fn check_name(name: &str) -> Result<(), ClientError> {
    let name_ok = !name.trim().is_empty()
        && name.len() <= MAX_GROUP_NAME_BYTES
        && !name.chars().any(char::is_control);
    if name_ok {
        Ok(())
    } else {
        Err(ClientError::InvalidInput(format!(
            "a group name is 1 to {MAX_GROUP_NAME_BYTES} bytes of text without control characters"
        )))
    }
}

/// Checks a list of members typed by the user: valid usernames, each once, not `me`.
pub fn check_new_members(me: &str, members: &[String]) -> Result<BTreeSet<String>, ClientError> {
    if members.is_empty() {
        return Err(ClientError::InvalidInput("name at least one member".into()));
    }
    let mut set = BTreeSet::new();
    for m in members {
        username::validate(m).map_err(|_| ClientError::UnknownContact(m.clone()))?;
        if m == me {
            return Err(ClientError::InvalidInput(
                "you are in your groups already: name the others".into(),
            ));
        }
        set.insert(m.clone());
    }
    Ok(set)
}

/// Why a group context from the network is refused: bounded before anything is stored.
pub(crate) fn check_context(ctx: &GroupContext) -> Result<(), String> {
    if ctx.group_id.len() != 16 {
        return Err("its group id is not 16 bytes".into());
    }
    if ctx.members.is_empty() || ctx.members.len() > MAX_GROUP_MEMBERS {
        return Err(format!(
            "its group lists {} members (1 to {MAX_GROUP_MEMBERS} allowed)",
            ctx.members.len()
        ));
    }
    if check_name(&ctx.name).is_err() {
        return Err("its group name is empty, too long or has control characters".into());
    }
    if ctx.members.iter().any(|m| username::validate(m).is_err()) {
        return Err("its group lists a member name that is not a username".into());
    }
    if let Some(c) = &ctx.change {
        if c.subjects.len() > MAX_GROUP_MEMBERS
            || c.subjects.iter().any(|m| username::validate(m).is_err())
        {
            return Err("its membership change names invalid users".into());
        }
    }
    Ok(())
}

/// What to do with a group message that arrived.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Store it in the group's conversation; save `adopt` as the group's new state first
    /// (if the message brought a newer one); `event` describes a membership change.
    Accept {
        adopt: Option<GroupInfo>,
        event: Option<String>,
    },
    /// Drop it (acknowledged, not shown), for this reason.
    Refuse(String),
}

/// Decides what a group message from `sender`, carrying `ctx`, does to `local` (the group
/// as this device knows it, if it does). `ctx` passed [`check_context`].
pub(crate) fn judge(
    local: Option<&GroupInfo>,
    me: &str,
    sender: &str,
    ctx: &GroupContext,
    now_ms: u64,
) -> Verdict {
    let kind = ctx.change.as_ref().map(|c| c.kind());
    let Some(theirs) = GroupInfo::from_context(ctx, me, now_ms) else {
        return Verdict::Refuse("its group id is not 16 bytes".into());
    };
    let event = ctx
        .change
        .as_ref()
        .map(|c| describe(c, sender, me, &theirs));
    let Some(local) = local else {
        // A group this device has not heard of: it starts here, if this account is in it
        // and the sender is too (a left-message for an unknown group means nothing).
        if !theirs.joined {
            return Verdict::Refuse("a group this account is not in".into());
        }
        if !theirs.has(sender) {
            return Verdict::Refuse(format!("{sender} is not in the group they wrote to"));
        }
        return Verdict::Accept {
            adopt: Some(theirs),
            event,
        };
    };
    if !local.has(sender) {
        return Verdict::Refuse(format!(
            "{sender} is not a member of {:?} as this device knows it",
            local.name
        ));
    }
    let added_me = kind == Some(group_change::Kind::Created)
        || (kind == Some(group_change::Kind::Added)
            && ctx
                .change
                .as_ref()
                .is_some_and(|c| c.subjects.iter().any(|s| s == me)));
    if !local.joined && !added_me {
        // We left: the others learn it from our message; until they have, they may
        // still send to us. Not shown.
        return Verdict::Refuse("this account has left the group".into());
    }
    let newer = theirs.epoch > local.epoch
        || (theirs.epoch == local.epoch
            && (theirs.name != local.name || theirs.members != local.members)
            && GroupInfo::digest(&theirs.name, &theirs.members)
                > GroupInfo::digest(&local.name, &local.members));
    if newer {
        let adopt = GroupInfo {
            created_ms: local.created_ms,
            ..theirs
        };
        Verdict::Accept {
            adopt: Some(adopt),
            event,
        }
    } else {
        // An older view (the sender had not seen the latest change yet): the message is
        // theirs to send, the membership stays ours. A stale change is not replayed.
        Verdict::Accept {
            adopt: None,
            event: event.filter(|_| ctx.change.is_none()),
        }
    }
}

/// A membership change in words, from this account's point of view ("you" for it).
pub(crate) fn describe(change: &GroupChange, actor: &str, me: &str, group: &GroupInfo) -> String {
    let who = |u: &str| {
        if u == me {
            "you".to_string()
        } else {
            u.to_string()
        }
    };
    let list = |names: &[String]| names.iter().map(|n| who(n)).collect::<Vec<_>>().join(", ");
    let by = who(actor);
    match change.kind() {
        group_change::Kind::Created => {
            let others: Vec<String> = group.others(actor);
            format!(
                "{by} created the group “{}” with {}",
                group.name,
                list(&others)
            )
        }
        group_change::Kind::Added => format!("{by} added {}", list(&change.subjects)),
        group_change::Kind::Removed => format!("{by} removed {}", list(&change.subjects)),
        group_change::Kind::Left => format!("{by} left"),
        group_change::Kind::Unspecified => format!("{by} changed the group"),
    }
}

/// A change of the given kind naming `subjects`.
pub(crate) fn change(kind: group_change::Kind, subjects: Vec<String>) -> GroupChange {
    GroupChange {
        kind: kind as i32,
        subjects,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use group_change::Kind;

    fn group(epoch: u64, members: &[&str]) -> GroupInfo {
        GroupInfo {
            id: GroupId([1; 16]),
            name: "trip".into(),
            epoch,
            members: members.iter().map(|m| m.to_string()).collect(),
            joined: true,
            created_ms: 5,
        }
    }

    fn ctx(epoch: u64, members: &[&str], change: Option<(Kind, &[&str])>) -> GroupContext {
        let mut g = group(epoch, members);
        g.members.sort();
        g.context(change.map(|(k, s)| super::change(k, s.iter().map(|x| x.to_string()).collect())))
    }

    #[test]
    fn conversation_keys_round_trip_and_are_not_usernames() {
        let id = GroupId::random();
        let key = id.conversation_key();
        assert_eq!(GroupId::from_conversation_key(&key), Some(id));
        assert_eq!(GroupId::from_conversation_key("bob"), None);
        assert!(
            username::validate(&key).is_err(),
            "no user can be named like a group"
        );
    }

    #[test]
    fn a_new_group_starts_when_we_and_the_sender_are_in_it() {
        let c = ctx(1, &["alice", "bob", "carol"], Some((Kind::Created, &[])));
        match judge(None, "bob", "alice", &c, 9) {
            Verdict::Accept {
                adopt: Some(g),
                event: Some(e),
            } => {
                assert!(g.joined && g.epoch == 1 && g.created_ms == 9);
                assert_eq!(e, "alice created the group “trip” with you, carol");
            }
            other => panic!("{other:?}"),
        }
        let without_me = ctx(1, &["alice", "carol"], None);
        assert!(matches!(
            judge(None, "bob", "alice", &without_me, 9),
            Verdict::Refuse(_)
        ));
        let without_sender = ctx(1, &["bob", "carol"], None);
        assert!(matches!(
            judge(None, "bob", "alice", &without_sender, 9),
            Verdict::Refuse(_)
        ));
    }

    #[test]
    fn only_members_speak_and_a_newer_epoch_wins() {
        let local = group(2, &["alice", "bob", "carol"]);
        // Dave is not a member here, whatever his message claims.
        let claim = ctx(
            9,
            &["alice", "bob", "carol", "dave"],
            Some((Kind::Added, &["dave"])),
        );
        assert!(matches!(
            judge(Some(&local), "bob", "dave", &claim, 0),
            Verdict::Refuse(_)
        ));
        // Carol removes alice: adopted, described.
        let removal = ctx(3, &["bob", "carol"], Some((Kind::Removed, &["alice"])));
        match judge(Some(&local), "bob", "carol", &removal, 0) {
            Verdict::Accept {
                adopt: Some(g),
                event: Some(e),
            } => {
                assert_eq!(g.members, ["bob", "carol"]);
                assert_eq!(g.created_ms, 5, "kept from the local record");
                assert_eq!(e, "carol removed alice");
            }
            other => panic!("{other:?}"),
        }
        // An older view: the message counts, the membership stays.
        let stale = ctx(1, &["alice", "bob"], None);
        assert_eq!(
            judge(Some(&local), "bob", "alice", &stale, 0),
            Verdict::Accept {
                adopt: None,
                event: None
            }
        );
    }

    #[test]
    fn two_changes_with_the_same_epoch_settle_the_same_way_everywhere() {
        let base = group(2, &["alice", "bob", "carol"]);
        let a = ctx(
            3,
            &["alice", "bob", "carol", "dave"],
            Some((Kind::Added, &["dave"])),
        );
        let b = ctx(
            3,
            &["alice", "bob", "carol", "erin"],
            Some((Kind::Added, &["erin"])),
        );
        // Device 1 sees a then b, device 2 sees b then a: both end on the same list.
        let end = |first: &GroupContext, second: &GroupContext| {
            let mut g = base.clone();
            for (c, from) in [(first, "alice"), (second, "carol")] {
                if let Verdict::Accept { adopt: Some(n), .. } = judge(Some(&g), "bob", from, c, 0) {
                    g = n;
                }
            }
            g.members
        };
        assert_eq!(end(&a, &b), end(&b, &a));
    }

    #[test]
    fn after_leaving_nothing_is_shown_until_added_again() {
        let mut local = group(4, &["alice", "carol"]);
        local.joined = false;
        let chat = ctx(4, &["alice", "bob", "carol"], None);
        assert!(matches!(
            judge(Some(&local), "bob", "alice", &chat, 0),
            Verdict::Refuse(_)
        ));
        let back = ctx(5, &["alice", "bob", "carol"], Some((Kind::Added, &["bob"])));
        match judge(Some(&local), "bob", "alice", &back, 0) {
            Verdict::Accept {
                adopt: Some(g),
                event,
            } => {
                assert!(g.joined);
                assert_eq!(event.as_deref(), Some("alice added you"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn contexts_from_the_network_are_bounded() {
        let ok = ctx(1, &["alice", "bob"], None);
        assert!(check_context(&ok).is_ok());
        let mut bad = ok.clone();
        bad.group_id = vec![1; 3];
        assert!(check_context(&bad).is_err());
        let mut bad = ok.clone();
        bad.members = (0..=MAX_GROUP_MEMBERS).map(|i| format!("u{i}")).collect();
        assert!(check_context(&bad).is_err());
        let mut bad = ok.clone();
        bad.members.push("Not A Name".into());
        assert!(check_context(&bad).is_err());
        let mut bad = ok.clone();
        bad.name = "x".repeat(MAX_GROUP_NAME_BYTES + 1);
        assert!(check_context(&bad).is_err());
        let mut bad = ok;
        bad.name = "a\nb".into();
        assert!(check_context(&bad).is_err());
    }

    #[test]
    fn typed_members_are_checked() {
        assert!(check_new_members("alice", &[]).is_err());
        assert!(check_new_members("alice", &["alice".into()]).is_err());
        assert!(check_new_members("alice", &["Bob".into()]).is_err());
        let set =
            check_new_members("alice", &["bob".into(), "bob".into(), "carol".into()]).unwrap();
        assert_eq!(set.len(), 2);
    }
}
