//! Threading policy: the windows and switches of the rules, per channel.

use std::collections::BTreeMap;
use std::time::Duration;

use switchboard_core::Channel;

/// How one channel threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelPolicy {
    /// Rule 3: a message joins the open conversation on the same channel
    /// account whose last message is at most this old.
    pub inactivity: Duration,
    /// Rule 4: a message joins the customer's conversation on another
    /// channel that is open and active within this window; `None` turns
    /// cross-channel continuation off for messages on this channel.
    pub continuation: Option<Duration>,
    /// Rule 5: a resolved conversation reopens for a matching message at
    /// most this long after it was resolved.
    pub reopen: Duration,
    /// Email without thread headers also needs the normalized subject to
    /// match under rule 3.
    pub match_subject: bool,
}

impl ChannelPolicy {
    /// The design's defaults: 24 h inactivity, 2 h continuation, 7 d reopen.
    pub fn default_for(channel: Channel) -> Self {
        ChannelPolicy {
            inactivity: Duration::from_secs(24 * 3600),
            continuation: Some(Duration::from_secs(2 * 3600)),
            reopen: Duration::from_secs(7 * 24 * 3600),
            match_subject: channel == Channel::Email,
        }
    }
}

/// The policy of every channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    channels: BTreeMap<Channel, ChannelPolicy>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            channels: Channel::ALL
                .into_iter()
                .map(|c| (c, ChannelPolicy::default_for(c)))
                .collect(),
        }
    }
}

impl Policy {
    /// Sets one channel's policy.
    pub fn with(mut self, channel: Channel, policy: ChannelPolicy) -> Self {
        self.channels.insert(channel, policy);
        self
    }

    /// One channel's policy.
    pub fn channel(&self, channel: Channel) -> ChannelPolicy {
        self.channels
            .get(&channel)
            .copied()
            .unwrap_or_else(|| ChannelPolicy::default_for(channel))
    }
}
