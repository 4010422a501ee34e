//! The few Nix settings a bare `garret probe` reads, from the files and
//! variables Nix itself reads them from, in Nix's order (later wins):
//!
//! 1. `$NIX_CONF_DIR/nix.conf` (default `/etc/nix/nix.conf`);
//! 2. the user files: `$NIX_USER_CONF_FILES` (colon-separated) if set,
//!    else `nix/nix.conf` in each of `$XDG_CONFIG_DIRS` (default
//!    `/etc/xdg`) and then `$XDG_CONFIG_HOME` (default `$HOME/.config`);
//! 3. the text of `$NIX_CONFIG`.
//!
//! Parsed conservatively: `name = value` lines, `#` comments, `extra-NAME`
//! appending to `NAME`. `include` and `!include` lines are not followed, and
//! anything else that does not parse is ignored, as Nix ignores unknown
//! settings: the probe reports what it found, so a setting it missed shows.

use std::collections::HashMap;
use std::path::PathBuf;

/// Settings by name, values as written (lists are whitespace-separated).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NixConf {
    settings: HashMap<String, String>,
}

impl NixConf {
    /// Reads the configuration Nix would read, with `var` looking up the
    /// environment. Files that do not exist or cannot be read are skipped.
    pub fn load(var: impl Fn(&str) -> Option<String>) -> Self {
        let mut conf = Self::default();
        for file in files(&var) {
            if let Ok(text) = std::fs::read_to_string(&file) {
                conf.apply(&text);
            }
        }
        if let Some(text) = var("NIX_CONFIG") {
            conf.apply(&text);
        }
        conf
    }

    /// Applies the lines of one configuration text over what is set.
    pub fn apply(&mut self, text: &str) {
        for line in text.lines() {
            let line = line.split_once('#').map_or(line, |(before, _)| before);
            let Some((name, value)) = line.split_once('=') else {
                continue;
            };
            let (name, value) = (name.trim(), value.trim());
            if name.is_empty() || name.contains(char::is_whitespace) {
                continue;
            }
            match name.strip_prefix("extra-") {
                Some(base) => {
                    let entry = self.settings.entry(base.to_owned()).or_default();
                    if !entry.is_empty() && !value.is_empty() {
                        entry.push(' ');
                    }
                    entry.push_str(value);
                }
                None => {
                    self.settings.insert(name.to_owned(), value.to_owned());
                }
            }
        }
    }

    /// A list setting's items (`substituters`, `trusted-public-keys`).
    pub fn list(&self, name: &str) -> Vec<&str> {
        self.settings
            .get(name)
            .map(|v| v.split_whitespace().collect())
            .unwrap_or_default()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.settings.get(name).map(String::as_str)
    }
}

/// `$NIX_CONF_DIR`, where Nix also looks for its default `netrc`.
pub fn conf_dir(var: impl Fn(&str) -> Option<String>) -> PathBuf {
    var("NIX_CONF_DIR").map_or_else(|| PathBuf::from("/etc/nix"), PathBuf::from)
}

/// The configuration files in the order they apply.
fn files(var: &impl Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut files = vec![conf_dir(var).join("nix.conf")];
    if let Some(list) = var("NIX_USER_CONF_FILES") {
        files.extend(list.split(':').filter(|f| !f.is_empty()).map(PathBuf::from));
        return files;
    }
    let system_dirs = var("XDG_CONFIG_DIRS").unwrap_or_else(|| "/etc/xdg".into());
    // Nix lists the user's own directory first and applies the list
    // backwards, so it wins over the system-wide ones.
    files.extend(
        system_dirs
            .split(':')
            .filter(|d| !d.is_empty())
            .rev()
            .map(|d| PathBuf::from(d).join("nix/nix.conf")),
    );
    let home = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config")));
    files.extend(home.map(|h| h.join("nix/nix.conf")));
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_override_and_extra_appends() {
        let mut conf = NixConf::default();
        conf.apply(
            "# a comment\nsubstituters = https://a/x https://b/y # trailing\n\
             trusted-public-keys = a-1:AAAA\n\
             extra-trusted-public-keys = b-1:BBBB\n\
             include other.conf\n!include maybe.conf\nnot a setting\n",
        );
        conf.apply("substituters = https://c/z\nextra-substituters =\n");
        assert_eq!(conf.list("substituters"), ["https://c/z"]);
        assert_eq!(conf.list("trusted-public-keys"), ["a-1:AAAA", "b-1:BBBB"]);
        assert_eq!(conf.get("include other.conf"), None);
        assert!(conf.list("netrc-file").is_empty());
    }

    #[test]
    fn files_apply_in_nix_order_and_nix_config_last() {
        let dir = tempfile::tempdir().unwrap();
        let write = |path: &str, text: &str| {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write(
            "etc/nix.conf",
            "substituters = https://system/a\npriority = 1\n",
        );
        write("xdg/nix/nix.conf", "substituters = https://xdg-dirs/a\n");
        write("home/nix/nix.conf", "substituters = https://user/a\n");
        let root = dir.path().to_str().unwrap().to_owned();
        let env = |extra: Option<&'static str>| {
            let root = root.clone();
            move |name: &str| match name {
                "NIX_CONF_DIR" => Some(format!("{root}/etc")),
                "XDG_CONFIG_DIRS" => Some(format!("{root}/xdg")),
                "XDG_CONFIG_HOME" => Some(format!("{root}/home")),
                "NIX_CONFIG" => extra.map(str::to_owned),
                _ => None,
            }
        };
        let conf = NixConf::load(env(None));
        assert_eq!(conf.list("substituters"), ["https://user/a"]);
        assert_eq!(conf.get("priority"), Some("1"));
        let conf = NixConf::load(env(Some("extra-substituters = https://env/a")));
        assert_eq!(
            conf.list("substituters"),
            ["https://user/a", "https://env/a"]
        );
    }
}
