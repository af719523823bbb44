/* intentqueue's admin pages: live refresh of the queues page, progress of the
   dead-letter grouping, and "select all" for failed jobs. Plain JavaScript, no
   libraries, nothing loaded from elsewhere. */
(function () {
    "use strict";

    function setHidden(element, hidden) {
        if (hidden) {
            element.setAttribute("hidden", "");
        } else {
            element.removeAttribute("hidden");
        }
    }

    function updateCard(card, data) {
        card.dataset.paused = data.paused ? "1" : "0";
        card.querySelectorAll("[data-when-paused]").forEach(function (el) {
            setHidden(el, !data.paused);
        });
        card.querySelectorAll("[data-when-running]").forEach(function (el) {
            setHidden(el, data.paused);
        });
        Object.keys(data.figures).forEach(function (key) {
            var cell = card.querySelector('[data-metric="' + key + '"]');
            if (!cell) {
                return;
            }
            var target = cell.querySelector("a") || cell;
            target.textContent = data.figures[key];
        });
        var problems = card.querySelector("[data-problems]");
        if (problems) {
            problems.replaceChildren.apply(problems, data.problems.map(function (text) {
                var item = document.createElement("li");
                item.textContent = text;
                return item;
            }));
            setHidden(problems, data.problems.length === 0);
        }
        Object.keys(data.charts).forEach(function (key) {
            var chart = card.querySelector('[data-chart="' + key + '"]');
            if (chart) {
                // Server-rendered SVG of our own figures (escaped on the server).
                chart.innerHTML = data.charts[key];
            }
        });
    }

    function startLiveQueues(root) {
        var url = root.dataset.liveUrl;
        var every = Math.max(2, parseInt(root.dataset.refreshSeconds, 10) || 5) * 1000;
        var status = root.querySelector("[data-live-status]");
        var statusLine = root.querySelector(".iq-live-status");
        var redisError = root.querySelector("[data-redis-error]");
        function refresh() {
            if (document.hidden) {
                return;
            }
            fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
                .then(function (response) {
                    if (!response.ok) {
                        throw new Error("HTTP " + response.status);
                    }
                    return response.json();
                })
                .then(function (payload) {
                    payload.queues.forEach(function (data) {
                        var card = root.querySelector('[data-queue="' + data.name + '"]');
                        if (card) {
                            updateCard(card, data);
                        }
                    });
                    if (redisError) {
                        redisError.querySelector("span").textContent = payload.redis_error;
                        setHidden(redisError, !payload.redis_error);
                    }
                    statusLine.classList.remove("iq-stale");
                    status.textContent = "Live: updated " + new Date(payload.at).toLocaleTimeString() + ".";
                    root.dataset.lastRefresh = payload.at;
                })
                .catch(function (error) {
                    statusLine.classList.add("iq-stale");
                    status.textContent = "Live refresh failed (" + error.message + "); retrying.";
                });
        }
        window.setInterval(refresh, every);
        document.addEventListener("visibilitychange", refresh);
    }

    function followGrouping(banner) {
        var url = banner.dataset.syncUrl;
        function poll() {
            fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
                .then(function (response) { return response.json(); })
                .then(function (report) {
                    if (report.pending === 0 && !report.busy) {
                        window.location.reload();
                        return;
                    }
                    banner.textContent = "Grouping failed jobs: " + report.indexed.toLocaleString() +
                        " grouped, " + report.pending.toLocaleString() + " to go.";
                    window.setTimeout(poll, 500);
                })
                .catch(function () { window.setTimeout(poll, 3000); });
        }
        window.setTimeout(poll, 300);
    }

    function selection(form) {
        var all = form.querySelector("[data-select-all]");
        var boxes = form.querySelectorAll('input[name="job_ids"]');
        var counter = form.querySelector("[data-selected-count]");
        function count() {
            var n = Array.prototype.filter.call(boxes, function (b) { return b.checked; }).length;
            if (counter) {
                counter.textContent = n ? n + " selected" : "";
            }
        }
        if (all) {
            all.addEventListener("change", function () {
                boxes.forEach(function (box) { box.checked = all.checked; });
                count();
            });
        }
        boxes.forEach(function (box) { box.addEventListener("change", count); });
    }

    document.addEventListener("DOMContentLoaded", function () {
        var queues = document.querySelector("[data-live-url]");
        if (queues) {
            startLiveQueues(queues);
        }
        var banner = document.querySelector("[data-sync-url]");
        if (banner) {
            followGrouping(banner);
        }
        document.querySelectorAll("[data-selection]").forEach(selection);
    });
})();
