//! What to type next: the CLI's own words for the client library's errors.
//!
//! The library says what went wrong; only the command line knows its commands, so the
//! hints live here (an app shows its own buttons instead).

use postern_client::{ClientError, Failure, ProxyMode};

/// A hint for the first client error in `error`'s chain, if there is one to give.
pub fn for_error(error: &anyhow::Error) -> Option<String> {
    let e = error
        .chain()
        .find_map(|e| e.downcast_ref::<ClientError>())?;
    Some(match e {
        ClientError::NoProfile(_) => {
            "create one with `postern account create NAME --network FILE`, or pass --home DIR"
                .into()
        }
        ClientError::ProfileExists(_) => {
            "use another --home (or POSTERN_HOME) for a second account".into()
        }
        ClientError::UnknownDevice => {
            "create a new profile with `postern --home NEW_DIR account create NAME --network FILE`"
                .into()
        }
        ClientError::UsernameTaken(_) => "choose another username".into(),
        ClientError::UnknownContact(_) => "check the spelling of the username".into(),
        ClientError::NoSuchProxy(_) => "see `postern proxy list` for the saved proxies".into(),
        ClientError::NoContactKeys(c) => format!(
            "send {c} a message (or wait for theirs), then run `postern contact verify {c}` again"
        ),
        ClientError::ContactKeysIncomplete(_) => {
            "connect to the service (`postern status` says how) and run this again".into()
        }
        ClientError::SafetyNumberChanged(c) => {
            format!("run `postern contact verify {c}` to see the new number")
        }
        ClientError::NoRoute { mode, attempts } if attempts.is_empty() => match mode {
            ProxyMode::On => "add one with `postern proxy add ADDRESS|LINK`, or allow direct \
                              connections with `postern proxy use auto`"
                .into(),
            _ => "check the network file".into(),
        },
        ClientError::NoRoute { attempts, .. } => {
            let speaks_tls = attempts
                .iter()
                .any(|a| matches!(a.failed, Some((_, Failure::SpeaksTls))));
            let impostor = attempts
                .iter()
                .any(|a| matches!(a.failed, Some((_, Failure::ServerIdentity))));
            if impostor && attempts.len() == 1 {
                return Some(
                    "something on this path pretends to be the service: check that the network \
                     file came from the operator, and use another network or relay"
                        .into(),
                );
            }
            let mut hint = String::from(
                "if your network blocks the service, add a proxy (`postern proxy add ADDRESS|LINK`) \
                 or try another one; `postern proxy check` tests each saved proxy",
            );
            if speaks_tls {
                hint.push_str("; a relay port answered in TLS: save it again with `--tls`");
            }
            hint
        }
        _ => return None,
    })
}

/// What to do about a route that failed this way.
pub fn for_failure(failure: &Failure) -> &'static str {
    use Failure::*;
    match failure {
        NameNotResolved(_) => "Hint: check the spelling of the host; your DNS may also be filtered — try the relay's IP address.",
        Refused => "Hint: nothing listens there; the relay may be down or on another port.",
        TimedOut => "Hint: the network may be blocking this relay; try another proxy address.",
        Unreachable(_) => "Hint: your network cannot reach that address; try another proxy.",
        TlsFailed(_) => "Hint: TLS to the relay failed; it may be blocked or not a TLS port (try --no-tls).",
        SpeaksTls => "Hint: this port speaks TLS: try --tls (`postern proxy add ADDRESS --tls` to save it so).",
        ServiceDidNotAnswer => "Hint: the relay works but cannot reach the service; tell its operator or try another proxy.",
        ServerIdentity => "Warning: something on this path pretends to be the service; do not use this proxy.",
        WrongSecret => "Hint: ask the relay's operator for its current link (`postern relay link ... --secret`) and import it again.",
        Other(_) => "Hint: try another proxy.",
    }
}
