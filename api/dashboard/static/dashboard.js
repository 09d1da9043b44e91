// The dashboard's own script. htmx refreshes the live parts; this draws the charts of the last
// hour (uPlot) from the data each refresh carries, keeps open tracebacks open across refreshes,
// and says when the page is not updating.
(function () {
  "use strict";
  const charts = new Map(); // queue -> {figure, plot}
  let openDetails = [];

  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function chartOptions(width) {
    const axis = { stroke: css("--muted"), grid: { stroke: css("--line") }, ticks: { stroke: css("--line") } };
    return {
      width: width,
      height: 150,
      cursor: { y: false },
      scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
      axes: [axis, Object.assign({ size: 40 }, axis)],
      series: [
        {},
        { label: "completed", stroke: css("--completed"), width: 2, points: { show: false } },
        { label: "failed", stroke: css("--failed"), width: 2, points: { show: false } },
      ],
    };
  }

  function total(values) {
    return values.reduce((sum, v) => sum + v, 0);
  }

  function drawCharts() {
    const source = document.getElementById("throughput-data");
    const box = document.getElementById("charts");
    if (!source || !box || typeof uPlot === "undefined") return;
    const data = JSON.parse(source.dataset.charts);
    for (const [queue, series] of Object.entries(data.queues)) {
      const points = [data.minutes, series.completed, series.failed];
      let chart = charts.get(queue);
      if (!chart) {
        const figure = document.createElement("figure");
        figure.className = "chart";
        figure.dataset.queue = queue;
        figure.setAttribute("role", "img");
        const caption = document.createElement("figcaption");
        caption.textContent = queue;
        figure.appendChild(caption);
        box.appendChild(figure);
        const plot = new uPlot(chartOptions(figure.clientWidth - 10), points, figure);
        chart = { figure: figure, plot: plot };
        charts.set(queue, chart);
      } else {
        chart.plot.setData(points);
      }
      chart.figure.setAttribute(
        "aria-label",
        `${queue}, last hour: ${total(series.completed)} completed, ${total(series.failed)} failed`,
      );
    }
    for (const [queue, chart] of charts) {
      if (!(queue in data.queues)) {
        chart.plot.destroy();
        chart.figure.remove();
        charts.delete(queue);
      }
    }
  }

  function setStatus(problem) {
    document.getElementById("connection").textContent = problem || "";
    if (!problem) {
      document.getElementById("updated").textContent = "Updated " + new Date().toLocaleTimeString();
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    drawCharts();
    setStatus(null);
    const body = document.body;
    body.addEventListener("htmx:beforeSwap", (e) => {
      openDetails = Array.from(e.detail.target.querySelectorAll("details[open][id]"), (d) => d.id);
    });
    body.addEventListener("htmx:afterSwap", (e) => {
      for (const id of openDetails) document.getElementById(id)?.setAttribute("open", "");
      if (e.detail.target.id === "live") drawCharts();
      if (e.detail.requestConfig.verb === "get") setStatus(null);
    });
    // A hidden tab does not poll; it refreshes as soon as it is shown again.
    body.addEventListener("htmx:beforeRequest", (e) => {
      if (document.hidden && e.detail.requestConfig.verb === "get") e.preventDefault();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) htmx.trigger(body, "dashboard-refresh");
    });
    body.addEventListener("htmx:responseError", (e) => {
      setStatus(`Not updating: the server answered ${e.detail.xhr.status}. Retrying…`);
    });
    body.addEventListener("htmx:sendError", () => setStatus("Not updating: the server cannot be reached. Retrying…"));
    body.addEventListener("htmx:timeout", () => setStatus("Not updating: the server is slow to answer. Retrying…"));
    window.addEventListener("resize", () => {
      for (const chart of charts.values()) {
        chart.plot.setSize({ width: chart.figure.clientWidth - 10, height: 150 });
      }
    });
  });
})();
