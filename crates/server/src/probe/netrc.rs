//! The netrc file Nix hands to curl (`netrc-file`): Attic's `attic use`
//! writes the cache token there as the password, which Nix sends as Basic
//! auth. A bare probe takes its token from the entry of the cache's host.

/// Which entry the tokens being read belong to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Entry {
    None,
    Host,
    OtherHost,
    Default,
}

/// The password of `host`'s first `machine` entry, else of the `default`
/// entry. Like curl, matches the host name without the port. Parsing stops
/// at a `macdef`, whose body is not made of tokens.
pub fn password_for(text: &str, host: &str) -> Option<String> {
    let mut tokens = text.split_whitespace();
    let mut entry = Entry::None;
    let mut default = None;
    while let Some(token) = tokens.next() {
        match token {
            "machine" => {
                entry = if tokens.next() == Some(host) {
                    Entry::Host
                } else {
                    Entry::OtherHost
                };
            }
            "default" => entry = Entry::Default,
            "login" | "account" => {
                tokens.next();
            }
            "password" => {
                let password = tokens.next()?;
                match entry {
                    Entry::Host => return Some(password.to_owned()),
                    Entry::Default if default.is_none() => default = Some(password.to_owned()),
                    _ => {}
                }
            }
            "macdef" => break,
            _ => {}
        }
    }
    default
}

#[cfg(test)]
mod tests {
    use super::password_for;

    #[test]
    fn the_hosts_entry_wins_over_default() {
        let netrc = "default login x password fallback\n\
                     machine other.example login a password nope\n\
                     machine cache.example\n  login garret\n  password tok1\n\
                     machine cache.example login b password second\n";
        assert_eq!(
            password_for(netrc, "cache.example").as_deref(),
            Some("tok1")
        );
        assert_eq!(
            password_for(netrc, "elsewhere").as_deref(),
            Some("fallback")
        );
        assert_eq!(password_for("machine a password p", "b"), None);
        assert_eq!(password_for("", "a"), None);
    }

    #[test]
    fn a_truncated_or_macro_file_is_not_an_error() {
        assert_eq!(password_for("machine a login x password", "a"), None);
        assert_eq!(
            password_for("macdef init\nmachine a password p\n", "a"),
            None
        );
    }
}
