//! Fields of a thread's `/proc` files (`stat`, `status`), for the trace's
//! per-thread report and the idle poller's permission check.

/// Field `n` of a `stat` file, numbered as in proc(5) (1 = pid, 2 = comm,
/// 19 = nice, 39 = processor). Counting starts after the last `)`, since
/// the command name may itself contain spaces and parentheses.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n.checked_sub(3)?)
}

/// The value of `key` (e.g. `"CapEff"`) in a `status` file, trimmed.
pub fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_past_a_name_with_spaces() {
        // pid (comm) state ppid ...: 19 nice, 39 processor.
        let mut f: Vec<String> = (3..=52).map(|i| format!("f{i}")).collect();
        f[19 - 3] = "-5".into();
        f[39 - 3] = "1".into();
        let stat = format!("1234 (a (b) c) {}", f.join(" "));
        assert_eq!(stat_field(&stat, 3), Some("f3"));
        assert_eq!(stat_field(&stat, 19), Some("-5"));
        assert_eq!(stat_field(&stat, 39), Some("1"));
        assert_eq!(stat_field(&stat, 2), None);
        assert_eq!(stat_field(&stat, 99), None);
        assert_eq!(stat_field("no name", 3), None);
    }

    #[test]
    fn status_fields_by_key() {
        let status = "Name:\tvmm\nCapEff:\t000001ffffffffff\nvoluntary_ctxt_switches:\t7\n";
        assert_eq!(status_field(status, "CapEff"), Some("000001ffffffffff"));
        assert_eq!(status_field(status, "voluntary_ctxt_switches"), Some("7"));
        assert_eq!(status_field(status, "Cap"), None);
    }

    #[test]
    fn own_thread() {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        assert_eq!(stat_field(&stat, 1), None, "field 1 is before the name");
        assert!(stat.starts_with(&format!("{tid} (")));
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert_eq!(status_field(&status, "Pid"), Some(tid.to_string().as_str()));
    }
}
