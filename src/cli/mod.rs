//! Command-line tools beyond `start`/`init`: the SQL shell (`mkts connect`), bulk transfer
//! (`mkts import`, `mkts export`) and provider backfills (`mkts backfill polygon`).

pub mod backfill;
pub mod connect;
pub mod estimate;
pub mod jsonrpc;
pub mod transfer;

use std::io::{BufRead, IsTerminal};

/// A password from the terminal without echo (after `prompt` on stderr), or the first line of stdin when
/// stdin is not a terminal (`echo "$PW" | mkts hash-password`). The trailing newline is not part of it.
pub fn read_password(prompt: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        return Ok(rpassword::prompt_password(prompt)?);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
