// The console's only script. Pages work without it; it adds two conveniences, and the engine
// checks everything again when a form is sent.
(function () {
  // The package form shows the fields its package type uses: credits for credits and hybrid,
  // a duration for hybrid and duration. A hidden field is also disabled, so the form does not
  // send a value the type forbids.
  var type = document.getElementById("package_type");
  function toggle(name, used) {
    document.getElementById("field-" + name).hidden = !used;
    document.getElementById(name).disabled = !used;
  }
  function show() {
    toggle("credits_amount", type.value === "credits" || type.value === "hybrid");
    toggle("duration_days", type.value === "hybrid" || type.value === "duration");
  }
  if (type && document.getElementById("field-credits_amount")) {
    type.addEventListener("change", show);
    show();
  }

  // A form with data-confirm asks before it is sent (revoking a grant, for example).
  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute && event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) event.preventDefault();
  });
})();
