//! Resident memory of a process tree, read from `/proc`.

/// The resident set size, in bytes, of `pid` and all its descendants (threads' children
/// included). `None` if `pid` is gone. Processes that vanish during the walk are skipped.
pub fn tree_rss(pid: u32) -> Option<u64> {
    subtree_rss(pid, true)
}

/// The resident set size, in bytes, of `pid`'s descendants, and of `pid` itself when
/// `include_root`. `None` if `pid` is gone.
#[allow(unsafe_code)] // sysconf(_SC_PAGESIZE) has no preconditions
pub(crate) fn subtree_rss(pid: u32, include_root: bool) -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as u64,
        _ => 4096,
    };
    let mut total = 0u64;
    let mut stack = vec![pid];
    let mut seen = 0usize;
    let mut root = true;
    while let Some(p) = stack.pop() {
        seen += 1;
        if seen > 100_000 {
            break; // a fork bomb is not worth walking further
        }
        let statm = match std::fs::read_to_string(format!("/proc/{p}/statm")) {
            Ok(s) => s,
            Err(_) if root => return None,
            Err(_) => continue,
        };
        let count = include_root || !root;
        root = false;
        if let Some(rss) =
            statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).filter(|_| count)
        {
            total += rss * page;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for t in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(t.path().join("children")) {
                stack.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
            }
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_rss_is_positive_and_a_missing_pid_is_none() {
        assert!(super::tree_rss(std::process::id()).is_some_and(|b| b > 0));
        assert_eq!(super::tree_rss(u32::MAX - 1), None);
    }
}
