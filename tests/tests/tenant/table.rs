//! The ACL category table the proxy's command policy uses is what a real redis-server says.

use anyhow::{bail, Result};
use datamesh_tests::acl_table::{ScratchRedis, TABLE_PATH};

#[test]
fn acl_category_table_matches_a_live_redis_server() -> Result<()> {
    let path = datamesh_tests::project_root().join(TABLE_PATH);
    let checked_in = std::fs::read_to_string(&path)?;
    let server = ScratchRedis::start()?;
    let live = server.table()?;
    if live != checked_in {
        let diff: Vec<String> = live
            .lines()
            .filter(|l| !checked_in.lines().any(|c| c == *l))
            .map(|l| format!("+ {l}"))
            .chain(
                checked_in
                    .lines()
                    .filter(|l| !live.lines().any(|c| c == *l))
                    .map(|l| format!("- {l}")),
            )
            .take(40)
            .collect();
        bail!(
            "{} differs from redis-server {}'s COMMAND reply:\n{}\n\
             Regenerate it with `cargo xtask gen-acl-table`, review the diff (new commands, \
             changed categories change what the default tenant policy allows), and rebuild.",
            path.display(),
            server.version()?,
            diff.join("\n")
        );
    }
    Ok(())
}
