//! `fhirsync nats keygen`: a new NKey user key pair for `[nats]
//! nkey_seed_file`; the public key goes into the server's authorization.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum NatsCmd {
    /// Make an NKey user key pair: the seed goes to a new file (mode 0600),
    /// the public key is printed for the server's config.
    Keygen {
        /// Where to write the seed; an existing file is never overwritten.
        #[arg(long)]
        seed_file: PathBuf,
    },
}

pub fn run(cmd: NatsCmd) -> anyhow::Result<()> {
    match cmd {
        NatsCmd::Keygen { seed_file } => {
            let kp = nkeys::KeyPair::new_user();
            let seed = kp
                .seed()
                .map_err(|e| anyhow::anyhow!("cannot make a seed: {e}"))?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&seed_file).with_context(|| {
                format!(
                    "cannot create {} (it must not exist yet)",
                    seed_file.display()
                )
            })?;
            writeln!(f, "{seed}")?;
            println!("{}", kp.public_key());
            eprintln!(
                "seed written to {}; put the public key above in the server's authorization, e.g.\n  authorization {{ users = [ {{ nkey: {} }} ] }}",
                seed_file.display(),
                kp.public_key()
            );
            Ok(())
        }
    }
}
