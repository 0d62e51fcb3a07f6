//! The console's users file: one line per user, `name:role:argon2-hash`
//! (PHC string, argon2id). Written by `fhirsync user add`, read at start.

use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything, including resolving conflicts and retrying dead letters.
    Admin,
    /// Looks only.
    Viewer,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// argon2 PHC string.
    pub hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("cannot write {0}: {1}")]
    Write(String, std::io::Error),
    #[error("{file}:{line}: {why}")]
    Bad {
        file: String,
        line: usize,
        why: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Least password length accepted by `user add`.
pub const PASSWORD_LEN_MIN: usize = 12;

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
}

/// The users of a file; a missing file has none.
pub fn load(path: &Path) -> Result<Vec<User>, UsersError> {
    let file = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(UsersError::Read(file, e)),
    };
    let mut users: Vec<User> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| UsersError::Bad {
            file: file.clone(),
            line: i + 1,
            why: why.to_owned(),
        };
        let mut parts = line.splitn(3, ':');
        let (Some(name), Some(role), Some(hash)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected name:role:hash"));
        };
        if !valid_name(name) {
            return Err(bad("bad user name"));
        }
        let role = Role::parse(role).ok_or_else(|| bad("role must be admin or viewer"))?;
        PasswordHash::new(hash).map_err(|_| bad("the hash is not an argon2 PHC string"))?;
        if users.iter().any(|u| u.name == name) {
            return Err(bad("user listed twice"));
        }
        users.push(User {
            name: name.to_owned(),
            role,
            hash: hash.to_owned(),
        });
    }
    Ok(users)
}

/// The argon2id hash of a password, with a fresh salt.
pub fn hash_password(password: &str) -> String {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .expect("the system's random source");
    let salt = SaltString::encode_b64(&salt).expect("salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2")
        .to_string()
}

/// Whether `password` matches a PHC hash.
pub fn verify(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Adds or replaces a user and rewrites the file (0600) atomically.
pub fn add(path: &Path, name: &str, role: Role, password: &str) -> Result<(), UsersError> {
    if !valid_name(name) {
        return Err(UsersError::Invalid(format!(
            "user name '{name}': 1 to 64 of A-Z a-z 0-9 . _ - @"
        )));
    }
    if password.chars().count() < PASSWORD_LEN_MIN {
        return Err(UsersError::Invalid(format!(
            "the password must have at least {PASSWORD_LEN_MIN} characters"
        )));
    }
    let mut users = load(path)?;
    users.retain(|u| u.name != name);
    users.push(User {
        name: name.to_owned(),
        role,
        hash: hash_password(password),
    });
    save(path, &users)
}

/// Removes a user; `false` when there was none of that name.
pub fn remove(path: &Path, name: &str) -> Result<bool, UsersError> {
    let mut users = load(path)?;
    let before = users.len();
    users.retain(|u| u.name != name);
    if users.len() == before {
        return Ok(false);
    }
    save(path, &users)?;
    Ok(true)
}

fn save(path: &Path, users: &[User]) -> Result<(), UsersError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = path.display().to_string();
    let tmp = path.with_extension("tmp");
    let mut text = String::from("# fhirsync console users: name:role:argon2id hash\n");
    for u in users {
        text.push_str(&format!("{}:{}:{}\n", u.name, u.role.as_str(), u.hash));
    }
    let w = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    w().map_err(|e| UsersError::Write(file, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_verify_remove() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("users");
        add(&f, "amina", Role::Admin, "correct horse battery").unwrap();
        add(&f, "joe", Role::Viewer, "another long password").unwrap();
        let u = load(&f).unwrap();
        assert_eq!(u.len(), 2);
        assert!(u[0].hash.starts_with("$argon2id$"));
        assert!(verify(&u[0].hash, "correct horse battery"));
        assert!(!verify(&u[0].hash, "correct horse battery!"));
        assert!(add(&f, "x", Role::Admin, "short").is_err());
        assert!(add(&f, "bad name", Role::Admin, "long enough password").is_err());
        assert!(remove(&f, "joe").unwrap());
        assert!(!remove(&f, "joe").unwrap());
        assert_eq!(load(&f).unwrap().len(), 1);
        std::fs::write(&f, "amina:root:$argon2id$x\n").unwrap();
        assert!(load(&f).unwrap_err().to_string().contains(":1: role"));
    }
}
