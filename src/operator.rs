//! The operator running `dynamicproxy routes`, recorded as the writer of
//! the routes it changes.

use std::os::unix::fs::MetadataExt;

/// The operator's login: `SUDO_USER` (the person behind `sudo`), else
/// `USER`, else the name of the process's user from `/etc/passwd`, else
/// `uid N`. Routes are often changed as root through sudo, where the person
/// is the useful answer, not `root`.
pub fn login() -> String {
    for var in ["SUDO_USER", "USER"] {
        if let Ok(name) = std::env::var(var)
            && !name.trim().is_empty()
        {
            return name;
        }
    }
    // `/proc/self` belongs to the process's user: its uid without libc.
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else { return "unknown".into() };
    passwd_name(uid).unwrap_or_else(|| format!("uid {uid}"))
}

/// The name of `uid` in `/etc/passwd`, if listed there.
fn passwd_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?;
        (id.parse::<u32>().ok()? == uid).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_in_passwd() {
        assert_eq!(passwd_name(0).as_deref(), Some("root"));
    }
}
