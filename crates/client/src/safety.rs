//! Safety numbers: 60 digits two people compare in person to check that nobody sits
//! between them.
//!
//! The server hands out the identity keys a first message is encrypted to, and the client
//! pins them on first use; a server (or anyone who holds its key) could hand out its own
//! keys instead, and only the two people can tell, by comparing what their clients pinned.
//! The number is Signal's construction (`NumericFingerprintGenerator`, version 0), with
//! both Olm identity keys of every device of each side:
//!
//! * one side's input is `u16 version (0) ‖ u8 len(username) ‖ username ‖ u32 n ‖ keys`,
//!   where `keys` is, for each of the side's `n` devices, its Ed25519 key then its
//!   Curve25519 key (32 bytes each), devices sorted by those 64 bytes — all big-endian;
//! * `h = SHA-512(input)`, then 5200 times `h = SHA-512(h ‖ keys)` (slow on purpose: a
//!   forger must search keys whose number matches);
//! * the first 30 bytes of `h` give 30 digits: six 5-byte big-endian numbers, each
//!   modulo 100000, printed as 5 digits;
//! * the two sides' 30 digits are joined in the order of their usernames (the smaller
//!   first), so both people see the same 60 digits, shown as 12 groups of 5.
//!
//! The Curve25519 key is the one every Olm session with the device is authenticated by;
//! the Ed25519 key signs the device's one-time keys. Covering both means any substitution
//! the server could make changes the number. See `docs/protocol.md`, "Safety numbers".

use std::fmt;

use sha2::{Digest, Sha512};

/// The version of the construction, hashed into every number.
pub const SAFETY_NUMBER_VERSION: u16 = 0;
/// SHA-512 iterations per side (Signal's count).
const ITERATIONS: usize = 5200;
/// Digits per side.
const SIDE_DIGITS: usize = 30;

/// One device's two Olm identity keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceIdentity {
    pub ed25519: [u8; 32],
    pub curve25519: [u8; 32],
}

impl DeviceIdentity {
    /// From pinned key bytes; `None` if either key is missing or not 32 bytes.
    pub fn from_slices(ed25519: Option<&[u8]>, curve25519: &[u8]) -> Option<Self> {
        Some(Self {
            ed25519: ed25519?.try_into().ok()?,
            curve25519: curve25519.try_into().ok()?,
        })
    }
}

/// One side of a conversation: a username and the identity keys of its devices.
#[derive(Debug, Clone)]
pub struct Party<'a> {
    pub username: &'a str,
    pub devices: &'a [DeviceIdentity],
}

/// Why a safety number cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SafetyNumberError {
    #[error("no identity keys are known for {0}")]
    NoDevices(String),
    #[error("a safety number is between two different users, not {0} and itself")]
    SameUser(String),
    #[error("the username {0:?} is longer than 255 bytes")]
    UsernameTooLong(String),
}

/// The 60 digits both people compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    digits: String,
    /// The two usernames, in the order their halves appear.
    users: [String; 2],
}

impl SafetyNumber {
    /// The number between `a` and `b`; the same whichever is passed first.
    pub fn compute(a: Party<'_>, b: Party<'_>) -> Result<Self, SafetyNumberError> {
        if a.username == b.username {
            return Err(SafetyNumberError::SameUser(a.username.to_string()));
        }
        let (first, second) = if a.username < b.username {
            (a, b)
        } else {
            (b, a)
        };
        let mut digits = side_digits(&first)?;
        digits.push_str(&side_digits(&second)?);
        Ok(Self {
            digits,
            users: [first.username.to_string(), second.username.to_string()],
        })
    }

    /// The 60 digits without spaces.
    pub fn digits(&self) -> &str {
        &self.digits
    }

    /// Twelve groups of five digits.
    pub fn groups(&self) -> Vec<&str> {
        (0..self.digits.len())
            .step_by(5)
            .map(|i| &self.digits[i..i + 5])
            .collect()
    }

    /// The two usernames, in the order their halves appear in the number.
    pub fn users(&self) -> [&str; 2] {
        [&self.users[0], &self.users[1]]
    }

    /// What the QR code carries: the version, both usernames and the digits, as text a
    /// phone's camera shows as it is (`postern://safety?v=0&users=alice,bob&number=…`).
    pub fn qr_payload(&self) -> String {
        format!(
            "postern://safety?v={SAFETY_NUMBER_VERSION}&users={},{}&number={}",
            self.users[0], self.users[1], self.digits
        )
    }
}

impl fmt::Display for SafetyNumber {
    /// The groups separated by spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.groups().join(" "))
    }
}

impl serde::Serialize for SafetyNumber {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.digits)
    }
}

fn side_digits(party: &Party<'_>) -> Result<String, SafetyNumberError> {
    if party.devices.is_empty() {
        return Err(SafetyNumberError::NoDevices(party.username.to_string()));
    }
    let name_len = u8::try_from(party.username.len())
        .map_err(|_| SafetyNumberError::UsernameTooLong(party.username.to_string()))?;
    let mut devices = party.devices.to_vec();
    devices.sort();
    devices.dedup();
    let mut keys = Vec::with_capacity(devices.len() * 64);
    for d in &devices {
        keys.extend_from_slice(&d.ed25519);
        keys.extend_from_slice(&d.curve25519);
    }
    let count = u32::try_from(devices.len()).unwrap_or(u32::MAX);
    let mut hash = Sha512::new()
        .chain_update(SAFETY_NUMBER_VERSION.to_be_bytes())
        .chain_update([name_len])
        .chain_update(party.username.as_bytes())
        .chain_update(count.to_be_bytes())
        .chain_update(&keys)
        .finalize();
    for _ in 0..ITERATIONS {
        hash = Sha512::new()
            .chain_update(hash)
            .chain_update(&keys)
            .finalize();
    }
    let mut digits = String::with_capacity(SIDE_DIGITS);
    for chunk in hash[..SIDE_DIGITS].chunks(5) {
        let value = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        digits.push_str(&format!("{:05}", value % 100_000));
    }
    Ok(digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(seed: u8) -> DeviceIdentity {
        DeviceIdentity {
            ed25519: [seed; 32],
            curve25519: [seed.wrapping_add(100); 32],
        }
    }

    fn number(a: &str, ad: &[DeviceIdentity], b: &str, bd: &[DeviceIdentity]) -> SafetyNumber {
        SafetyNumber::compute(
            Party {
                username: a,
                devices: ad,
            },
            Party {
                username: b,
                devices: bd,
            },
        )
        .unwrap()
    }

    #[test]
    fn both_sides_compute_the_same_number() {
        let (alice, bob) = ([device(1)], [device(2)]);
        let seen_by_alice = number("alice", &alice, "bob", &bob);
        let seen_by_bob = number("bob", &bob, "alice", &alice);
        assert_eq!(seen_by_alice, seen_by_bob);
        assert_eq!(seen_by_alice.users(), ["alice", "bob"]);
        // The order of a side's devices does not matter either.
        let two = [device(3), device(4)];
        let two_reversed = [device(4), device(3)];
        assert_eq!(
            number("alice", &alice, "carol", &two),
            number("carol", &two_reversed, "alice", &alice)
        );
    }

    #[test]
    fn the_number_changes_with_any_key_or_name() {
        let (alice, bob) = ([device(1)], [device(2)]);
        let base = number("alice", &alice, "bob", &bob);
        let mut new_curve = device(2);
        new_curve.curve25519[31] ^= 1;
        let mut new_ed = device(2);
        new_ed.ed25519[0] ^= 0x80;
        for (what, other) in [
            ("curve25519", number("alice", &alice, "bob", &[new_curve])),
            ("ed25519", number("alice", &alice, "bob", &[new_ed])),
            (
                "a second device",
                number("alice", &alice, "bob", &[device(2), device(5)]),
            ),
            ("username", number("alice", &alice, "bobby", &bob)),
        ] {
            assert_ne!(base, other, "{what}");
        }
        // Only bob's half changes when bob's key does.
        let changed = number("alice", &alice, "bob", &[device(9)]);
        assert_eq!(base.digits()[..30], changed.digits()[..30]);
        assert_ne!(base.digits()[30..], changed.digits()[30..]);
    }

    #[test]
    fn sixty_digits_in_twelve_groups_of_five() {
        let n = number("alice", &[device(1)], "bob", &[device(2)]);
        assert_eq!(n.digits().len(), 60);
        assert!(n.digits().bytes().all(|b| b.is_ascii_digit()));
        let groups = n.groups();
        assert_eq!(groups.len(), 12);
        assert!(groups.iter().all(|g| g.len() == 5));
        assert_eq!(n.to_string().len(), 60 + 11);
        assert_eq!(
            n.qr_payload(),
            format!("postern://safety?v=0&users=alice,bob&number={}", n.digits())
        );
    }

    #[test]
    fn known_answer() {
        // Pins the construction: a change here breaks every number users compared. The
        // digits were computed independently (Python's hashlib, from the description in
        // the module documentation), not by this code.
        let n = number("alice", &[device(1)], "bob", &[device(2)]);
        assert_eq!(
            n.digits(),
            "590282102697971344224803584512404925781296257979915522270112"
        );
    }

    #[test]
    fn no_keys_or_same_user_is_an_error() {
        let none = SafetyNumber::compute(
            Party {
                username: "alice",
                devices: &[device(1)],
            },
            Party {
                username: "bob",
                devices: &[],
            },
        );
        assert_eq!(none, Err(SafetyNumberError::NoDevices("bob".into())));
        let same = SafetyNumber::compute(
            Party {
                username: "alice",
                devices: &[device(1)],
            },
            Party {
                username: "alice",
                devices: &[device(2)],
            },
        );
        assert_eq!(same, Err(SafetyNumberError::SameUser("alice".into())));
    }
}
