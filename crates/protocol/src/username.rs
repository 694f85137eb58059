//! Account names: 3–32 characters of `[a-z0-9_.-]`.

/// Checks a username, returning a message that tells the user what to change.
pub fn validate(name: &str) -> Result<(), String> {
    let len = name.chars().count();
    if !(3..=32).contains(&len) {
        return Err(format!(
            "username {name:?} must be 3 to 32 characters long (it has {len})"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "username {name:?} contains {bad:?}: use only lowercase letters a-z, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_rejects() {
        assert!(validate("alice").is_ok());
        assert!(validate("a.b-c_9").is_ok());
        assert!(validate("ab").is_err());
        assert!(validate(&"a".repeat(33)).is_err());
        assert!(validate("Alice").is_err());
        assert!(validate("al ice").is_err());
        assert!(validate("alicé").is_err());
    }

    proptest! {
        #[test]
        fn valid_names_match_the_rule(name in "[a-z0-9_.-]{3,32}") {
            prop_assert!(validate(&name).is_ok());
        }

        #[test]
        fn never_panics(name in ".*") {
            let _ = validate(&name);
        }
    }
}
