// srsrelay player: lists live streams and plays one over WHEP (RFC 9725).
// No outside resources: iceServers is empty; the relay is ICE-lite and puts its
// candidates in the answer, so the offer is sent without waiting for gathering.
'use strict';

(() => {
  const LIST_INTERVAL_MS = 2000;
  const STATS_INTERVAL_MS = 1000;
  const RETRY_MIN_MS = 1000;
  const RETRY_MAX_MS = 10000;

  const $ = (id) => document.getElementById(id);
  const video = $('video');

  const state = {
    stream: null, // "app/name" being played
    status: 'idle', // idle | connecting | playing | waiting | error
    message: '',
    sessionUrl: null, // WHEP resource URL (Location) for DELETE
    retryMs: RETRY_MIN_MS,
    rtmpPort: 1935,
    live: [], // streams from /api/v1/streams
    listError: null, // why the stream list is not shown (API refused or unreachable)
  };
  // timing: milliseconds (performance.now) of this attempt's start (before the offer),
  // the WHEP answer and the first video frame shown; read by tests and bench/ttff.py.
  const player = { pc: null, state, timing: null };
  window.srsrelayPlayer = player;

  let retryTimer = null;
  let attempt = 0; // increments per play attempt; stale callbacks check it

  // -- status and URLs --------------------------------------------------------

  function setStatus(status, message) {
    state.status = status;
    state.message = message;
    const el = $('status');
    el.textContent = message;
    el.className = 'status' + (status === 'playing' ? ' ok' : status === 'error' ? ' error' : '');
    const overlay = $('overlay');
    if (status === 'playing') {
      overlay.classList.add('hidden');
    } else {
      overlay.textContent = message;
      overlay.classList.remove('hidden');
    }
    $('stop').disabled = state.stream === null;
  }

  function whepPath(key) {
    return '/whep/' + key.split('/').map(encodeURIComponent).join('/');
  }

  function showUrls() {
    const host = location.hostname || '127.0.0.1';
    const key = state.stream || 'live/test';
    $('whep-url').textContent = location.origin + whepPath(key);
    $('rtmp-url').textContent = 'rtmp://' + host + ':' + state.rtmpPort + '/' + key;
    $('publish-example').textContent =
      'ffmpeg -re -i input.mp4 -c:v libx264 -tune zerolatency -c:a aac -f flv ' +
      'rtmp://' + host + ':' + state.rtmpPort + '/' + key;
  }

  document.querySelectorAll('button.copy').forEach((button) => {
    button.addEventListener('click', async () => {
      const text = $(button.dataset.copy).textContent;
      try {
        await navigator.clipboard.writeText(text);
        button.textContent = 'Copied';
      } catch (err) {
        // Clipboard needs a secure context; the text is selectable instead.
        const range = document.createRange();
        range.selectNodeContents($(button.dataset.copy));
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        button.textContent = 'Selected';
      }
      setTimeout(() => { button.textContent = 'Copy'; }, 1500);
    });
  });

  // -- playing ------------------------------------------------------------------

  function closePeer() {
    if (player.pc) {
      player.pc.ontrack = null;
      player.pc.onconnectionstatechange = null;
      player.pc.close();
      player.pc = null;
    }
    if (state.sessionUrl) {
      fetch(state.sessionUrl, { method: 'DELETE', keepalive: true }).catch(() => {});
      state.sessionUrl = null;
    }
    video.srcObject = null;
  }

  function stop() {
    clearTimeout(retryTimer);
    attempt += 1;
    closePeer();
    state.stream = null;
    history.replaceState(null, '', location.pathname);
    setStatus('idle', 'Pick a live stream below.');
    renderStreams();
  }

  function scheduleRetry(reason) {
    clearTimeout(retryTimer);
    closePeer();
    const delay = state.retryMs;
    state.retryMs = Math.min(state.retryMs * 2, RETRY_MAX_MS);
    setStatus('waiting', reason + ' Retrying in ' + Math.round(delay / 1000) + ' s…');
    const key = state.stream;
    retryTimer = setTimeout(() => { if (state.stream === key) connect(); }, delay);
  }

  function play(key) {
    clearTimeout(retryTimer);
    attempt += 1;
    closePeer();
    state.stream = key;
    state.retryMs = RETRY_MIN_MS;
    history.replaceState(null, '', '?stream=' + encodeURIComponent(key).replace(/%2F/g, '/'));
    showUrls();
    renderStreams();
    connect();
  }

  async function connect() {
    const mine = ++attempt;
    const key = state.stream;
    setStatus('connecting', 'Connecting to ' + key + '…');
    const timing = { start: performance.now(), offer: null, answer: null, firstFrame: null };
    player.timing = timing;
    const pc = new RTCPeerConnection({ iceServers: [] });
    player.pc = pc;
    pc.addTransceiver('video', { direction: 'recvonly' });
    pc.addTransceiver('audio', { direction: 'recvonly' });
    const media = new MediaStream();
    pc.ontrack = (event) => {
      media.addTrack(event.track);
      if (video.srcObject !== media) video.srcObject = media;
      if (event.track.kind === 'video' && 'requestVideoFrameCallback' in video) {
        video.requestVideoFrameCallback(() => {
          if (player.timing === timing) timing.firstFrame = performance.now();
        });
      }
      startVideo();
    };
    pc.onconnectionstatechange = () => {
      if (mine !== attempt) return;
      const s = pc.connectionState;
      if (s === 'connected') {
        state.retryMs = RETRY_MIN_MS;
        setStatus('playing', 'Playing ' + key);
      } else if (s === 'failed' || s === 'closed') {
        scheduleRetry('Connection to ' + key + ' ' + s + '.');
      } else if (s === 'disconnected') {
        setStatus('waiting', 'Connection to ' + key + ' interrupted…');
      }
    };
    try {
      await pc.setLocalDescription(await pc.createOffer());
      timing.offer = performance.now();
      const response = await fetch(whepPath(key), {
        method: 'POST',
        headers: { 'Content-Type': 'application/sdp' },
        body: pc.localDescription.sdp,
      });
      const text = await response.text();
      if (mine !== attempt) return;
      // WHEP: 409 = stream not live yet, 503 = relay full, 429 = too many tries; all
      // carry Retry-After and are worth retrying.
      if (response.status === 409) {
        scheduleRetry('Stream ' + key + ' is not live yet: waiting for a publisher.');
        return;
      }
      if (response.status === 503 || response.status === 429) {
        const why = text.trim().replace(/\.$/, '') || 'the relay is busy';
        scheduleRetry(why.charAt(0).toUpperCase() + why.slice(1) + '.');
        return;
      }
      if (response.status !== 201) {
        closePeer();
        setStatus('error', 'The relay refused to play ' + key + ': ' + response.status +
          ' ' + text.trim());
        return;
      }
      const loc = response.headers.get('Location');
      state.sessionUrl = loc ? new URL(loc, location.href).href : null;
      timing.answer = performance.now();
      await pc.setRemoteDescription({ type: 'answer', sdp: text });
    } catch (err) {
      if (mine === attempt) scheduleRetry('Could not reach the relay: ' + err + '.');
    }
  }

  function startVideo() {
    video.play().catch(() => {
      // The browser blocked unmuted autoplay: start muted, the user can unmute.
      video.muted = true;
      updateMute();
      video.play().catch(() => {});
    });
  }

  function updateMute() {
    $('mute').textContent = video.muted ? 'Unmute' : 'Mute';
  }

  $('mute').addEventListener('click', () => {
    video.muted = !video.muted;
    updateMute();
  });
  $('stop').addEventListener('click', stop);
  window.addEventListener('pagehide', closePeer);

  // -- statistics ---------------------------------------------------------------

  const previous = { video: null, audio: null };

  function fmtBitrate(bps) {
    if (bps === null) return '–';
    return bps >= 1e6 ? (bps / 1e6).toFixed(2) + ' Mb/s' : Math.round(bps / 1e3) + ' kb/s';
  }

  function bitrate(kind, report) {
    const prev = previous[kind];
    previous[kind] = { bytes: report.bytesReceived, ts: report.timestamp };
    if (!prev || report.timestamp <= prev.ts) return null;
    return ((report.bytesReceived - prev.bytes) * 8 * 1000) / (report.timestamp - prev.ts);
  }

  async function updateStats() {
    const pc = player.pc;
    const cells = {
      size: '–', vbitrate: '–', fps: '–', abitrate: '–', frames: '–', loss: '–', jitter: '–',
      rtt: '–',
    };
    if (pc) {
      const stats = await pc.getStats();
      let received = 0;
      let lost = 0;
      stats.forEach((s) => {
        if (s.type === 'inbound-rtp') {
          received += s.packetsReceived || 0;
          lost += Math.max(0, s.packetsLost || 0);
          if (s.kind === 'video') {
            cells.vbitrate = fmtBitrate(bitrate('video', s));
            if (s.frameWidth) cells.size = s.frameWidth + '×' + s.frameHeight;
            if (s.framesPerSecond !== undefined) cells.fps = s.framesPerSecond + ' fps';
            cells.frames = String(s.framesDecoded || 0);
            if (s.jitterBufferEmittedCount) {
              const ms = (s.jitterBufferDelay / s.jitterBufferEmittedCount) * 1000;
              cells.jitter = Math.round(ms) + ' ms';
            }
          } else if (s.kind === 'audio') {
            cells.abitrate = fmtBitrate(bitrate('audio', s));
          }
        } else if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') {
          if (s.currentRoundTripTime !== undefined) {
            cells.rtt = Math.round(s.currentRoundTripTime * 1000) + ' ms';
          }
        }
      });
      if (received + lost > 0) cells.loss = ((100 * lost) / (received + lost)).toFixed(2) + ' %';
    } else {
      previous.video = previous.audio = null;
    }
    for (const [name, value] of Object.entries(cells)) $('s-' + name).textContent = value;
  }

  setInterval(() => { updateStats().catch(() => {}); }, STATS_INTERVAL_MS);

  // -- stream list --------------------------------------------------------------

  function fmtDuration(ms) {
    const s = Math.floor(ms / 1000);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const pad = (n) => String(n).padStart(2, '0');
    return (h ? h + ':' + pad(m) : String(m)) + ':' + pad(s % 60);
  }

  function cell(row, text) {
    const td = document.createElement('td');
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function renderStreams() {
    const body = $('streams');
    body.replaceChildren();
    if (state.listError) {
      const row = document.createElement('tr');
      cell(row, state.listError).colSpan = 6;
      body.appendChild(row);
      return;
    }
    if (state.live.length === 0) {
      const row = document.createElement('tr');
      cell(row, 'No live streams. Publish one over RTMP (see above).').colSpan = 6;
      body.appendChild(row);
      return;
    }
    for (const s of state.live) {
      const key = s.app + '/' + s.name;
      const row = document.createElement('tr');
      if (key === state.stream) row.className = 'playing';
      cell(row, key);
      cell(row, s.video ? s.video.codec + (s.video.profile_level_id ?
        ' (' + s.video.profile_level_id + ')' : '') : '–');
      cell(row, s.audio ? s.audio.codec : '–');
      cell(row, String(s.clients));
      cell(row, fmtDuration(s.live_ms));
      const button = document.createElement('button');
      button.type = 'button';
      button.textContent = key === state.stream ? 'Restart' : 'Play';
      button.addEventListener('click', () => play(key));
      cell(row, '').appendChild(button);
      body.appendChild(row);
    }
  }

  async function refreshStreams() {
    let response;
    try {
      response = await fetch('/api/v1/streams', { cache: 'no-store' });
    } catch (err) {
      state.listError = 'The stream list could not be loaded: ' + err + '.';
      renderStreams();
      return;
    }
    if (response.status === 401 || response.status === 403) {
      // The relay's API is locked down (api.access): no list, but ?stream=app/name plays.
      clearInterval(listTimer);
      state.live = [];
      state.listError = 'The stream list is not public on this relay (API answered ' +
        response.status + '). Play a stream by adding ?stream=app/name to this address.';
      renderStreams();
      return;
    }
    try {
      const data = await response.json();
      state.live = data.streams || [];
      state.listError = null;
    } catch (err) {
      state.listError = 'The stream list could not be read (' + response.status + ').';
      renderStreams();
      return;
    }
    renderStreams();
    const listed = state.live.some((s) => s.app + '/' + s.name === state.stream);
    if (state.stream && !listed && state.status === 'playing') {
      scheduleRetry('Stream ' + state.stream + ' ended.');
    } else if (state.stream && listed && state.status === 'waiting' && !player.pc) {
      // The stream is back: retry now instead of waiting out the backoff.
      clearTimeout(retryTimer);
      connect();
    }
  }

  async function loadInfo() {
    try {
      const response = await fetch('/api/v1/info', { cache: 'no-store' });
      // 401/403 when the API is locked down (api.access): keep the default port.
      if (response.ok) {
        const info = await response.json();
        if (info.rtmp_port) state.rtmpPort = info.rtmp_port;
      }
    } catch (err) {
      // Keep the default port.
    }
    showUrls();
  }

  // -- start ------------------------------------------------------------------------

  updateMute();
  setStatus('idle', 'Pick a live stream below.');
  showUrls();
  // Start playing before anything else competes for the page and the relay.
  const wanted = new URLSearchParams(location.search).get('stream');
  if (wanted) play(wanted.replace(/^\/+|\/+$/g, ''));
  loadInfo();
  const listTimer = setInterval(refreshStreams, LIST_INTERVAL_MS);
  refreshStreams();
})();
