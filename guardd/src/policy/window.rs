//! Weekly time windows, the values of a rule's `time` key.

/// A weekly window: on `days` (Monday = 0), from `start` to `end` minutes after midnight;
/// a window whose end is before its start runs past midnight into the next day.
#[derive(Clone, Copy)]
pub(super) struct Window {
    days: [bool; 7],
    start: u16,
    end: u16,
}

impl Window {
    /// Whether local weekday `day` (Monday = 0) at `minute` lies in the window.
    pub(super) fn contains(&self, day: usize, minute: u16) -> bool {
        if self.start <= self.end {
            self.days[day] && self.start <= minute && minute < self.end
        } else {
            (self.days[day] && minute >= self.start)
                || (self.days[(day + 6) % 7] && minute < self.end)
        }
    }
}

/// Day names, Monday first, as written in rules files and explanations.
pub(super) const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Parses `"mon-fri 08:00-19:00"`, `"sat,sun 10:00-12:00"`, `"fri 22:00-02:00"` (past midnight)
/// or `"08:00-19:00"` (every day).
pub(super) fn parse_window(s: &str) -> Result<Window, String> {
    let bad = || format!("{s:?} is not a time window such as \"mon-fri 08:00-19:00\"");
    let (days_part, hours) = match s.trim().rsplit_once(' ') {
        Some((d, h)) => (Some(d.trim()), h),
        None => (None, s.trim()),
    };
    let mut days = [days_part.is_none(); 7];
    if let Some(spec) = days_part {
        for part in spec.split(',') {
            let day = |d: &str| {
                DAYS.iter()
                    .position(|x| *x == d.trim().to_ascii_lowercase())
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day(a).ok_or_else(bad)?, day(b).ok_or_else(bad)?);
                    let mut d = a;
                    loop {
                        days[d] = true;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => days[day(part).ok_or_else(bad)?] = true,
            }
        }
    }
    let (start, end) = hours.split_once('-').ok_or_else(bad)?;
    let minutes = |t: &str| -> Option<u16> {
        let (h, m) = t.split_once(':')?;
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
    };
    let (start, end) = (
        minutes(start).ok_or_else(bad)?,
        minutes(end).ok_or_else(bad)?,
    );
    if start == end {
        return Err(format!("{s:?} is an empty time window"));
    }
    Ok(Window { days, start, end })
}
