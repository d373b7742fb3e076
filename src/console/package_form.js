// The package form shows the fields its package type uses: credits for credits and hybrid,
// a duration for hybrid and duration. The engine checks them again when the form is sent.
(function () {
  var type = document.getElementById("package_type");
  if (!type) return;
  function show() {
    var limited = type.value === "credits" || type.value === "hybrid";
    var expiring = type.value === "hybrid" || type.value === "duration";
    toggle("credits_amount", limited);
    toggle("duration_days", expiring);
  }
  // A hidden field is also disabled, so the form does not send a value the type forbids.
  function toggle(name, used) {
    document.getElementById("field-" + name).hidden = !used;
    document.getElementById(name).disabled = !used;
  }
  type.addEventListener("change", show);
  show();
})();
